"""Writing models for other tools: ``sl.save``'s companion files, and ``sl.export``.

``onnx`` writes an ONNX graph checked against the torch model (``parity``, ``report``).
What ``sl.save`` writes besides the tensors so that other tools read the directory right:

``hf_config`` marks compressed Hugging Face checkpoints so that transformers without slimline
refuses them; ``source_files`` carries over what the source directory had (tokenizer,
sentence-transformers modules, generation config); ``model_card`` writes ``README.md``.
"""
