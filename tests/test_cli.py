from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slimline.cli import main


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list(capsys) -> None:
    code, out, _ = _run(["list", "--json"], capsys)
    assert code == 0
    methods = {row["method"] for row in json.loads(out)}
    assert {"magnitude", "half", "compile"} <= methods


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"steps": [{"method": "nope"}]}, "unknown method 'nope'"),
        ({"steps": [{"method": "magnitude", "sparsity": 2.0}]}, "magnitude.sparsity"),
        ({"steps": [{"method": "magnitude", "colour": 1}]}, "unknown field(s) colour"),
        ({"steps": [{"method": "compile"}, {"method": "magnitude"}]}, "must come before"),
    ],
)
def test_compress_bad_recipe_one_line_exit_2(tmp_path, capsys, recipe, message: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    out_dir = tmp_path / "out"
    code, _, err = _run(
        ["compress", "--model", "digits-cnn", "--recipe", str(path), "--out", str(out_dir)], capsys
    )
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out_dir.exists()


def test_missing_model_and_recipe(tmp_path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: magnitude\n")
    code, _, err = _run(
        ["compress", "--model", str(tmp_path / "nope"), "--recipe", str(recipe),
         "--out", str(tmp_path / "o")], capsys,
    )
    assert code == 2 and "neither a built-in model" in err
    code, _, err = _run(
        ["compress", "--model", "digits-cnn", "--recipe", str(tmp_path / "missing.yaml"),
         "--out", str(tmp_path / "o")], capsys,
    )
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_compress_then_eval(tmp_path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: magnitude\n    sparsity: 0.3\n")
    out_dir = tmp_path / "out"
    code, out, _ = _run(
        ["compress", "--model", "digits-cnn", "--recipe", str(recipe), "--out", str(out_dir)],
        capsys,
    )
    assert code == 0, out
    assert (out_dir / "recipe.json").is_file() and (out_dir / "compress.json").is_file()
    report_path = tmp_path / "eval.json"
    code, out, _ = _run(
        ["eval", "--model", str(out_dir), "--report", str(report_path), "--runs", "3",
         "--batches", "2", "--metrics", "latency,size,accuracy,agreement"],
        capsys,
    )
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert set(report["models"]) == {"baseline", "model"}
    assert 0.8 < report["models"]["model"]["accuracy"] <= 1.0
    assert report["models"]["model"]["size_bytes_disk"] > 0


def test_entry_point_exit_code() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "slimline.cli", "eval", "--model", "/no/such/dir"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("slimline: error:")
    assert "Traceback" not in proc.stderr
