"""What ``sl.export`` did: the files written, the exporter used and the parity it measured.

The same dict is stored as ``export.json`` beside the exported model, so that a directory
says how faithful it is to the torch model it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimline.export.parity import STRICT, ParityCheck, Tolerance

REPORT_FILE = "export.json"


@dataclass
class ExportReport:
    """An exported model: where, which format and exporter, its inputs and outputs, parity."""

    path: Path
    format: str
    exporter: str  # "torchscript" (tracing) or "dynamo" (torch.export)
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    parity: list[ParityCheck]
    external_data: bool
    files: list[str] = field(default_factory=list)
    attempts: dict[str, str] = field(default_factory=dict)  # exporter -> why it was not kept
    # W8A8 layers written in standard operators (export/lowering.py), int8 weights kept.
    lowered: list[str] = field(default_factory=list)
    source: str | None = None  # the built-in model it came from (its data, its baseline)
    params: int | None = None  # the torch model's logical parameter count
    tolerance: Tolerance = STRICT  # what the parity checks had to meet
    details: dict[str, Any] = field(default_factory=dict)  # format-specific (gguf: dtype, ...)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "exporter": self.exporter,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "dynamic_axes": {k: {str(a): n for a, n in v.items()}
                             for k, v in self.dynamic_axes.items()},
            "parity": [p.to_dict() for p in self.parity],
            "tolerance": self.tolerance.to_dict(),
            "external_data": self.external_data,
            "files": self.files,
            "attempts": self.attempts,
            "lowered": self.lowered,
            "source": self.source,
            "params": self.params,
            "details": self.details,
        }

    def write(self, directory: Path) -> Path:
        target = directory / REPORT_FILE
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return target

    def summary(self) -> str:
        """One line per parity check, as the command line prints them, then what the format's
        details say the user may want to know (GGUF: packed layers rounded again, notes)."""
        lines = [
            f"parity {'ok' if p.passed else 'FAILED'} on input {tuple(p.shape)}: "
            f"max abs diff {p.max_abs_diff:.3g}, cosine {p.cosine:.6f}"
            for p in self.parity
        ]
        again = self.details.get("re_encoded") or []
        if again:
            lines.append(f"{len(again)} packed layer(s) re-encoded as {self.details.get('dtype')} "
                         "(rounded again: their grid is not the file's; quantize with "
                         "group_size: 32, symmetric for q8_0/q4_0, either for 4-bit q4_1, "
                         "to write their codes exactly)")
        for key in ("sliding_window_not_written", "tokenizer_caveat", "longrope_factors"):
            if key in self.details:
                lines.append(f"note: {key.replace('_', ' ')}: {self.details[key]}")
        return "\n".join(lines)
