"""The run key as a specification: equal for equal work however it is written, different
for anything that changes a result; and `--resume` reuses only what the key says is the
same, writing exactly what the run asked for."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxplain import cli, metrics
from onnxplain.runkey import canonical, file_digest, method_options, metric_settings, model_digest, run_key, target_text

MODELS = Path(__file__).resolve().parent.parent / "models"
TINY = MODELS / "tiny_cnn.onnx"

BASE = dict(model="m" * 64, method="integrated_gradients", options=method_options("integrated_gradients", {}),
            metric="deletion", settings=metric_settings("deletion", {}), target=target_text(None), input="i" * 64)


def test_the_key_is_the_same_however_equal_settings_are_written():
    spelled_out = dict(BASE, options=method_options("integrated_gradients", {"n_steps": 50}),
                       settings=metric_settings("deletion", {"steps": 50}), target=target_text("pred"))
    assert run_key(**BASE) == run_key(**spelled_out) == run_key(**dict(reversed(list(BASE.items()))))
    assert target_text(3) == target_text("3") and target_text([1, 2]) == target_text("1,2")


@pytest.mark.parametrize("change", [
    {"model": "n" * 64}, {"method": "gradient"}, {"options": method_options("integrated_gradients", {"n_steps": 8})},
    {"metric": "insertion"}, {"settings": metric_settings("deletion", {"steps": 10})}, {"target": target_text(3)},
    {"target": target_text("pos:1:2")}, {"input": "j" * 64},
])
def test_anything_that_changes_a_result_changes_the_key(change):
    assert run_key(**BASE) != run_key(**{**BASE, **change})


def test_the_onnxplain_version_is_part_of_the_key(monkeypatch):
    import onnxplain

    before = run_key(**BASE)
    monkeypatch.setattr(onnxplain, "__version__", "9.9.9")
    assert run_key(**BASE) != before


def test_arrays_are_keyed_by_their_bytes_and_models_by_their_bytes(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert canonical(a) == canonical(a.copy()) != canonical(a + 1)
    assert canonical(a) != canonical(a.astype(np.float64))
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(TINY.read_bytes())
    assert model_digest(copy) == model_digest(TINY) == model_digest(TINY.read_bytes()) == file_digest(TINY)


# ----------------------------------------------------------------------------- evaluate --resume


@pytest.fixture()
def inputs(tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"x{i}.npy")
        np.save(paths[-1], np.random.default_rng(i).normal(size=(1, 3, 32, 32)).astype(np.float32))
    return paths


def _evaluate(*args):
    r = CliRunner().invoke(cli.main, ["evaluate", str(TINY), *map(str, args), "-q"])
    assert r.exit_code == 0, r.output
    return r


def _count_evaluations(monkeypatch):
    calls = []
    original = metrics.evaluate

    def counting(explainer, x, methods, metric_names=(), **kw):
        calls.extend((m, k) for m in methods for k in metric_names)
        return original(explainer, x, methods, metric_names, **kw)

    monkeypatch.setattr(metrics, "evaluate", counting)
    return calls


def test_resume_with_fewer_methods_and_metrics_writes_only_what_was_asked(inputs, tmp_path, monkeypatch):
    """Before: the old occlusion/insertion table came back and r.json said methods
    ['gradient'] over a table containing occlusion."""
    out = tmp_path / "r.json"
    _evaluate(*inputs, "--methods", "gradient,occlusion", "-O", "occlusion:window=3,8,8", "--metrics",
              "deletion,insertion", "-S", "deletion:steps=4", "-S", "insertion:steps=4", "-o", out)
    first = json.loads(out.read_text())
    calls = _count_evaluations(monkeypatch)
    r = _evaluate(*inputs, "--methods", "gradient", "--metrics", "deletion", "-S", "deletion:steps=4", "-o", out,
                  "--resume")
    result = json.loads(out.read_text())
    assert result["methods"] == ["gradient"] and result["metrics"] == ["deletion"]
    assert set(result["table"]) == {"gradient"} and set(result["table"]["gradient"]) == {"deletion"}
    for record in result["records"]:
        for part in ("metrics", "curves", "extra"):
            assert set(record[part]) <= {"gradient"}
            assert all(set(cells) <= {"deletion"} for cells in record[part].values())
    assert "occlusion" not in r.output and "insertion" not in r.output
    assert calls == []  # the gradient's deletion cells were computed with these very settings: reused
    assert result["table"]["gradient"]["deletion"] == first["table"]["gradient"]["deletion"]


def test_resume_recomputes_what_another_setting_option_or_target_changes(inputs, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    common = ("--metrics", "deletion", "-o", out)
    _evaluate(*inputs, "--methods", "gradient,integrated_gradients", "-S", "deletion:steps=4", *common)
    calls = _count_evaluations(monkeypatch)
    _evaluate(*inputs, "--methods", "gradient,integrated_gradients", "-S", "deletion:steps=5", *common, "--resume")
    assert sorted(calls) == sorted([("gradient", "deletion"), ("integrated_gradients", "deletion")] * 2)
    assert len(json.loads(out.read_text())["records"][0]["curves"]["gradient"]["deletion"]["x"]) == 6
    calls.clear()
    _evaluate(*inputs, "--methods", "gradient,integrated_gradients", "-O", "integrated_gradients:n_steps=4",
              "-S", "deletion:steps=5", *common, "--resume")
    assert calls == [("integrated_gradients", "deletion")] * 2  # the gradient cells still hold
    calls.clear()
    _evaluate(*inputs, "--methods", "gradient", "-S", "deletion:steps=5", "-t", "3", *common, "--resume")
    assert calls == [("gradient", "deletion")] * 2
    assert json.loads(out.read_text())["target"] == "3"


def test_resume_keeps_only_this_runs_inputs(inputs, tmp_path):
    out = tmp_path / "r.json"
    _evaluate(*inputs, "--methods", "gradient", "--metrics", "deletion", "-S", "deletion:steps=3", "-o", out)
    _evaluate(inputs[1], "--methods", "gradient", "--metrics", "deletion", "-S", "deletion:steps=3", "-o", out,
              "--resume")
    assert json.loads(out.read_text())["inputs"] == [str(inputs[1])]


def test_resume_recomputes_an_input_whose_file_changed(inputs, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    args = ("--methods", "gradient", "--metrics", "deletion", "-S", "deletion:steps=3", "-o", out)
    _evaluate(inputs[0], *args)
    np.save(inputs[0], np.zeros((1, 3, 32, 32), np.float32))
    calls = _count_evaluations(monkeypatch)
    _evaluate(inputs[0], *args, "--resume")
    assert calls == [("gradient", "deletion")]


def test_validate_resume_reuses_only_records_of_the_same_method(inputs, tmp_path):
    report = tmp_path / "v.json"
    run = CliRunner().invoke
    base = ["validate", str(TINY), str(TINY), *map(str, inputs), "--report", str(report), "-q"]
    assert run(cli.main, base + ["-m", "gradient"]).exit_code == 0
    first = json.loads(report.read_text())["samples"]
    assert run(cli.main, base + ["-m", "input_x_gradient", "--resume"]).exit_code == 0
    again = json.loads(report.read_text())
    assert again["method"] == "input_x_gradient" and len(again["samples"]) == len(first)
    keys = {json.loads(line)["key"] for line in report.with_suffix(".jsonl").read_text().splitlines()}
    assert len(keys) == 2 * len(inputs)  # one record per input and method: nothing reused across methods
