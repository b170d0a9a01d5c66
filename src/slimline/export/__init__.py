"""Writing models for other tools: ``sl.save``'s companion files, and ``sl.export``.

``onnx`` and ``openvino`` write an ONNX graph / OpenVINO IR checked against the torch model
(``parity``, ``report``; shared steps in ``graph``, slimline's W8A8 layers in standard
operators in ``lowering``); ``runtime`` runs such a directory as a module, for ``slimline eval``.
What ``sl.save`` writes besides the tensors so that other tools read the directory right:

``hf_config`` marks compressed Hugging Face checkpoints so that transformers without slimline
refuses them; ``source_files`` carries over what the source directory had (tokenizer,
sentence-transformers modules, generation config); ``model_card`` writes ``README.md``.
"""
