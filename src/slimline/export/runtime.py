"""An exported directory (ONNX, OpenVINO IR or GGUF) run by its runtime, called like a torch
module.

``slimline eval --model <exported dir>`` measures an export beside the torch model it came
from: :class:`ExportedModel` takes the same batches (``model(**batch)``, ``model(tensor)``) and
answers with the exported output under its torch name (``logits``, ``last_hidden_state``, or
a plain tensor), so the evaluator's latency, quality and comparison code runs unchanged.

The runtime is opened on first call with ``torch.get_num_threads()`` threads (the evaluator
sets the count it measures with), and again when that count changes. OpenVINO runs in
float32 (its CPU plugin would pick bf16 on CPUs that have it), as the export's parity was
checked; ``precision="bf16"`` asks for the runtime's bf16 instead. A GGUF export runs in
llama.cpp (``export/gguf_runtime.py``), which also generates: ``slimline eval`` times its greedy
decode beside the torch model's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimline.export.report import REPORT_FILE

FORMATS = ("onnx", "openvino", "gguf")
_WEIGHT_FILES = {"onnx": ("model.onnx", "model.onnx.data"), "openvino": ("model.xml", "model.bin"),
                 "gguf": ("model.gguf",)}
_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino", "gguf": "llama_cpp"}


def import_runtime(directory: str | Path) -> None:
    """Import the runtime that runs the export in ``directory`` (a memory measurement counts
    the library before the model)."""
    import importlib

    fmt = _read_report(Path(directory))["format"]
    importlib.import_module(_RUNTIMES[fmt])


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``sl.export`` (it holds ``export.json``)."""
    return (Path(path) / REPORT_FILE).is_file()


class ExportedOutput(dict):  # type: ignore[type-arg]
    """The exported model's output by name, read as transformers' outputs are: ``out.logits``,
    ``out["logits"]`` or ``out[0]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


class ExportedModel(nn.Module):
    """The model exported to ``directory``, run by onnxruntime, OpenVINO or llama.cpp on the
    CPU."""

    def __init__(self, directory: str | Path, *, precision: str = "f32") -> None:
        super().__init__()
        self.directory = Path(directory)
        info = _read_report(self.directory)
        self.format: str = info["format"]
        self.input_names: list[str] = list(info["inputs"])
        self.output_name: str = info["outputs"][0]
        self.source: str | None = info.get("source")
        self.params: int | None = info.get("params")
        self.precision = precision
        self.vocab: int | None = info.get("details", {}).get("vocab")
        self.context: int | None = info.get("details", {}).get("context_length")
        self._runner: tuple[int, Any] | None = None  # (threads, session or compiled model)
        self._llamas: dict[bool, tuple[int, int, Any]] = {}  # logits_all -> (threads, ctx, llm)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        feeds = self._feeds(args, kwargs)
        if self.format == "gguf":
            from slimline.export.gguf_runtime import score

            ids = torch.from_numpy(feeds["input_ids"])
            # The mask says where each row's tokens are, whatever the export's example held.
            mask = kwargs.get("attention_mask")
            if mask is None and "attention_mask" in feeds:  # given by position
                mask = torch.from_numpy(feeds["attention_mask"])
            logits = score(self._llama(ids.shape[1], logits_all=True), ids, mask,
                           int(self.vocab or 0))
            return ExportedOutput({self.output_name: logits})
        out = torch.from_numpy(np.ascontiguousarray(self._run(feeds)))
        return out if self.output_name == "output" else ExportedOutput({self.output_name: out})

    def can_generate(self) -> bool:
        """Whether the runtime decodes (llama.cpp does; the ONNX and IR graphs here are one
        forward without a cache)."""
        return self.format == "gguf"

    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, do_sample: bool = False,
                 **_: Any) -> torch.Tensor:
        """Greedy decoding of ``max_new_tokens`` tokens per row by llama.cpp (GGUF exports
        only; an end-of-sequence token does not stop it), each row from its real tokens
        (``attention_mask``); the rows come back as given, the new tokens after them."""
        if not self.can_generate():
            raise ValueError(f"{self.directory}: a {self.format} export does not generate")
        if do_sample:
            raise ValueError(f"{self.directory}: llama.cpp runs greedy decoding here only")
        from slimline.export.gguf_runtime import greedy, real_span

        llm = self._llama(input_ids.shape[1] + max_new_tokens, logits_all=False)
        rows = []
        for i, row in enumerate(input_ids):
            real = row if attention_mask is None else row[real_span(attention_mask[i])]
            rows.append(row.tolist() + greedy(llm, real.tolist(), max_new_tokens))
        return torch.tensor(rows, dtype=input_ids.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the graph and weight files the runtime loads."""
        files = (self.directory / n for n in _WEIGHT_FILES[self.format])
        return sum(f.stat().st_size for f in files if f.is_file())

    def extra_repr(self) -> str:
        return f"format={self.format}, directory={str(self.directory)!r}"

    def _feeds(self, args: tuple[torch.Tensor, ...], kwargs: Mapping[str, torch.Tensor]
               ) -> dict[str, np.ndarray]:
        given = dict(zip(self.input_names, args, strict=False)) if args else {}
        given.update({k: v for k, v in kwargs.items() if k in self.input_names})
        missing = [n for n in self.input_names if n not in given]
        if missing:
            raise ValueError(f"{self.directory}: the exported model needs input(s) {missing}")
        return {n: given[n].detach().cpu().numpy() for n in self.input_names}

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        threads = torch.get_num_threads()
        if self._runner is None or self._runner[0] != threads:
            self._runner = (threads, self._open(threads))
        runner = self._runner[1]
        if self.format == "onnx":
            return runner.run([self.output_name], feeds)[0]  # type: ignore[no-any-return]
        return runner(feeds)[runner.output(0)]  # type: ignore[no-any-return]

    def _llama(self, tokens: int, *, logits_all: bool) -> Any:
        """llama.cpp's model, opened again when the thread count changes or ``tokens`` do not
        fit its cache (one for scoring every position, one for decoding)."""
        from slimline.export.gguf_runtime import context_for, open_llama

        threads = torch.get_num_threads()
        held = self._llamas.get(logits_all)
        if held is None or held[0] != threads or held[1] < tokens:
            context = context_for(tokens)
            held = (threads, context, open_llama(self.directory / "model.gguf", threads=threads,
                                                 context=context, logits_all=logits_all))
            self._llamas[logits_all] = held
        return held[2]

    def _open(self, threads: int) -> Any:
        if self.format == "openvino":
            from slimline.export.openvino import XML_FILE, compile_ir

            return compile_ir(self.directory / XML_FILE, self.precision, threads)
        from slimline.export.onnx import MODEL_FILE, onnx_session

        return onnx_session(self.directory / MODEL_FILE, threads=threads)


def _read_report(directory: Path) -> dict[str, Any]:
    path = directory / REPORT_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the export report: {exc}") from None
    if not isinstance(info, dict) or info.get("format") not in FORMATS:
        raise ValueError(f"{path}: not an export of format {' or '.join(FORMATS)}")
    return info
