from __future__ import annotations

import json
import subprocess
import sys

import pytest

import slimline as sl
from slimline import cli
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
    card = (out_dir / "README.md").read_text()  # the card now holds the measured figures
    accuracy = f"{100 * report['models']['model']['accuracy']:.2f} %"
    assert "## Measured by `slimline eval`" in card and accuracy in card, card[-1500:]
    assert f"`slimline eval --model {out_dir} --report" in card


def test_entry_point_exit_code() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "slimline.cli", "eval", "--model", "/no/such/dir"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("slimline: error:")
    assert "Traceback" not in proc.stderr


def _one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("r.yaml", "steps:\n  - method: [\n", "is not valid YAML"),
        ("r.yml", "steps: {method: magnitude\n", "is not valid YAML"),
        ("r.json", '{"steps": [}', "is not valid JSON"),
    ],
)
def test_recipe_syntax_error_names_the_file(tmp_path, capsys, name, text, message) -> None:
    path = tmp_path / name
    path.write_text(text)
    code, _, err = _run(
        ["compress", "--model", "digits-cnn", "--recipe", str(path), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert code == 2 and _one_line(err)
    assert message in err and str(path) in err


def test_recipe_that_is_a_directory(tmp_path, capsys) -> None:
    code, _, err = _run(
        ["compress", "--model", "digits-cnn", "--recipe", str(tmp_path), "--out", str(tmp_path)],
        capsys,
    )
    assert code == 2 and _one_line(err) and "is a directory" in err


def test_usage_error_is_one_line(capsys) -> None:
    code, _, err = _run(["compress", "--model", "digits-cnn"], capsys)
    assert code == 2 and _one_line(err)
    assert "--recipe" in err and "--out" in err


def _raising(exc: BaseException):
    def run(_args) -> int:
        raise exc

    return run


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(13, "Permission denied", "/data/r.yaml"),
        IsADirectoryError(21, "Is a directory", "/data"),
        FileNotFoundError(2, "No such file or directory", "/data/x"),
        ImportError("save_chart needs matplotlib: pip install slimline[plot]"),
    ],
)
def test_user_caused_os_errors_are_one_line_exit_2(monkeypatch, capsys, exc) -> None:
    monkeypatch.setattr(cli, "_list", _raising(exc))
    code, _, err = _run(["list"], capsys)
    assert code == 2 and _one_line(err)
    assert err.startswith("slimline: error:") and str(exc) in err


def test_keyboard_interrupt_exit_130(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "_list", _raising(KeyboardInterrupt()))
    code, _, err = _run(["list"], capsys)
    assert code == 130 and _one_line(err) and "interrupted" in err


def test_internal_error_says_bug_exit_1(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "_list", _raising(RuntimeError("shape mismatch\nin layer 3")))
    code, _, err = _run(["list"], capsys)
    assert code == 1 and _one_line(err)
    assert "bug" in err and "RuntimeError: shape mismatch in layer 3" in err
    assert "--debug" in err


@pytest.mark.parametrize(
    "argv", [["--debug", "list"], ["list", "--debug"], ["--debug", "list", "--json"]]
)
def test_debug_before_or_after_the_command_reraises(monkeypatch, argv) -> None:
    monkeypatch.setattr(cli, "_list", _raising(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


def test_debug_reraises_user_errors_too(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "compress", "--model", "digits-cnn",
              "--recipe", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])


def test_eval_of_a_broken_checkpoint_is_one_line(tmp_path, capsys) -> None:
    from slimline.models import load_builtin

    target = tmp_path / "ck"
    sl.save(load_builtin("digits-cnn").model, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    code, _, err = _run(["eval", "--model", str(target), "--report", str(tmp_path / "r")],
                        capsys)
    assert code == 2 and _one_line(err)
    assert "model.safetensors" in err and not (tmp_path / "r").exists()


def test_entry_point_unknown_model_prints_exactly_one_line(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: magnitude\n")
    proc = subprocess.run(
        [sys.executable, "-m", "slimline.cli", "compress", "--model", "nonexistent",
         "--recipe", str(recipe), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "nonexistent" in proc.stderr and "Traceback" not in proc.stderr


def test_training_on_a_users_directory_defaults_to_its_calibration_text(tmp_path, capsys) -> None:
    from tests.train.test_launch import LINES, _llama_dir

    _llama_dir(tmp_path / "llama")
    (tmp_path / "user.txt").write_text("\n".join(LINES * 3) + "\n")  # lines of varied length
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - {method: rtn, bits: 4, group_size: 32}\n"
                      "  - {method: distill, steps: 2, quantized: train}\n")
    out = tmp_path / "out"
    code, _, err = _run(["compress", "--model", str(tmp_path / "llama"), "--recipe", str(recipe),
                         "--calibration", str(tmp_path / "user.txt"), "--out", str(out)], capsys)
    assert code == 0, err
    steps = json.loads((out / "compress.json").read_text())["steps"]
    assert any("packed layers trained" in n for n in steps[-1]["notes"])
    # Without calibration text, the one-line error names the training flag.
    recipe.write_text("steps:\n  - {method: distill, steps: 2}\n")
    code, _, err = _run(["compress", "--model", str(tmp_path / "llama"), "--recipe", str(recipe),
                         "--out", str(tmp_path / "o2")], capsys)
    last = err.strip().splitlines()[-1]  # (transformers' loading bar comes before it)
    assert code == 2 and last.startswith("slimline: error:") and "--train-data" in last, err
    assert "Traceback" not in err
