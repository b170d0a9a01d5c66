"""minilm compressed by the command line, opened by ``SentenceTransformer(out)``.

For each recipe, exactly what a user runs: ``slimline compress --model minilm --recipe R
--out OUT`` (CLI defaults: 8 calibration batches of 8 training sentences), then ``slimline
eval --model OUT --metrics cosine`` (the first 4 batches of 32 test sentences, cosine of the
mean-pooled embedding to the original's), then, in the same script, sentence-transformers:
``SentenceTransformer(OUT)`` and ``SentenceTransformer(<the package's all-MiniLM-L6-v2>)``
encode the same 128 test sentences; the column is the mean cosine of their embeddings. The two
cosines should agree (the output directory keeps the source's pooling and normalisation
modules; normalising does not change a cosine).

Usage: ``python -m benchmarks.minilm_sentence_transformers`` (writes the
``minilm-sentence-transformers`` section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

RECIPES: list[tuple[str, dict[str, Any]]] = [
    ("int8_dynamic", {"method": "int8_dynamic"}),
    ("smoothquant (dynamic)", {"method": "smoothquant"}),
    ("structured 50% heads + neurons", {"method": "structured", "sparsity": 0.5}),
]
TEST_SENTENCES = 128  # slimline eval's default: 4 batches of 32


def _cli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "slimline.cli", *args], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"slimline {args[0]} failed: {done.stderr.strip()[-500:]}")


def st_cosine(out: Path, sentences: list[str]) -> float:
    """Mean cosine of ``SentenceTransformer(out)``'s embeddings to the original model's."""
    from sentence_transformers import SentenceTransformer

    from slimline.models.minilm import minilm_dir

    original = SentenceTransformer(str(minilm_dir()), device="cpu")
    compressed = SentenceTransformer(str(out), device="cpu")
    a = original.encode(sentences, batch_size=32, convert_to_tensor=True)
    b = compressed.encode(sentences, batch_size=32, convert_to_tensor=True)
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double()).mean())


def main() -> None:
    from benchmarks.harness import conditions_line, markdown_table, print_table, write_section
    from slimline.models.minilm import sentence_splits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    sentences = sentence_splits("full")["test"][:TEST_SENTENCES]
    header = ["recipe", "slimline eval cosine", "SentenceTransformer(out) cosine", "|difference|"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, step in RECIPES:
            recipe, out = Path(tmp) / "r.yaml", Path(tmp) / label.split()[0]
            recipe.write_text(yaml.safe_dump({"steps": [step]}))
            _cli("compress", "--model", "minilm", "--recipe", str(recipe), "--out", str(out))
            report = Path(tmp) / "eval.json"
            _cli("eval", "--model", str(out), "--metrics", "cosine", "--report", str(report))
            evaluated = _eval_cosine(json.loads(report.read_text()))
            st = st_cosine(out, sentences)
            rows.append([label, f"{evaluated:.5f}", f"{st:.5f}", f"{abs(st - evaluated):.1e}"])
            print(rows[-1], flush=True)
    table = markdown_table(header, rows)
    body = (f"{conditions_line(torch.get_num_threads())}\n\n"
            f"{__doc__.split(chr(10) + chr(10))[1]}\n\n{table}\n")
    print_table("minilm through sentence-transformers", header, rows)
    if not args.no_write:
        write_section("minilm-sentence-transformers",
                      "minilm compressed, then opened by SentenceTransformer(out)", body)


def _eval_cosine(report: dict[str, Any]) -> float:
    for name, figures in report["models"].items():
        if name != "baseline" and "cosine" in figures:
            return float(figures["cosine"])
    raise KeyError(f"no cosine in the eval report: {report}")


if __name__ == "__main__":
    main()
