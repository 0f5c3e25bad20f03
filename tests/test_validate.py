"""`onnxplain validate` as a CI gate: passes on an exact copy and on a dynamically
quantized copy, fails (exit 1) on a model that decides from another region, usage errors
exit 2; single-model expectations; incremental per-file log and --resume."""

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxplain import cli
from onnxplain import validate as V


def invoke(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def mlp(path, seed=0):
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(rng.normal(size=(12, 32)).astype(np.float32), "W1"),
                     numpy_helper.from_array(rng.normal(size=32).astype(np.float32), "b1"),
                     numpy_helper.from_array(rng.normal(size=(32, 5)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def box_model(path, box):
    """Two classes on 3x16x16 images: class 0 scores the mean of `box`, class 1 a constant
    0.5. A model 'planted' on another box predicts the same way for other reasons."""
    mask = np.zeros((1, 3, 16, 16), np.float32)
    y1, y2, x1, x2 = box
    mask[:, :, y1:y2, x1:x2] = 1.0 / (3 * (y2 - y1) * (x2 - x1))
    nodes = [helper.make_node("Mul", ["x", "M"], ["xm"]), helper.make_node("ReduceSum", ["xm", "axes"], ["s"]),
             helper.make_node("Reshape", ["s", "col"], ["c0"]), helper.make_node("Mul", ["c0", "zero"], ["z"]),
             helper.make_node("Add", ["z", "half"], ["c1"]), helper.make_node("Concat", ["c0", "c1"], ["y"], axis=1)]
    inits = [numpy_helper.from_array(mask, "M"), numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 1], np.int64), "col"),
             numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
             numpy_helper.from_array(np.full((1, 1), 0.5, np.float32), "half")]
    graph = helper.make_graph(nodes, "box", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = tmp_path_factory.mktemp("validate")
    ref = mlp(d / "mlp.onnx")
    shutil.copy(ref, d / "copy.onnx")
    quantize_dynamic(str(ref), str(d / "mlp.int8.onnx"), weight_type=QuantType.QInt8)
    inputs = d / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        np.save(inputs / f"x{i}.npy", rng.normal(size=(4, 12)).astype(np.float32))
    return d, inputs


def test_a_model_validates_against_its_exact_copy(models, tmp_path):
    d, inputs = models
    r = invoke("validate", d / "mlp.onnx", d / "copy.onnx", inputs, "--report", tmp_path / "rep.json")
    assert r.exit_code == 0, r.output
    assert "PASS: 12 input(s)" in r.output
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["passed"] and report["method"] == "gradient"
    assert report["summary"]["rank_corr"]["worst"] == pytest.approx(1.0)


def test_a_dynamically_quantized_copy_keeps_its_reasons_white_box(models, tmp_path):
    # The quantized model is explained by the straight-through convention ('auto' is the
    # gradient), and the report says so; gradients and input x gradient are compared too.
    d, inputs = models
    # One sample per file: dynamic quantization computes one scale per batch, so the rows
    # of a batch are not independent samples (and onnxplain reads such a batch as one sample).
    single = tmp_path / "single"
    single.mkdir()
    for f in sorted(inputs.glob("*.npy")):
        for i, row in enumerate(np.load(f)):
            np.save(single / f"{f.stem}_{i}.npy", row[None])
    # (12 features: the top-10% are 2, one swap halves their overlap)
    r = invoke("validate", d / "mlp.onnx", d / "mlp.int8.onnx", single, "--report", tmp_path / "rep.json",
               "--min-rank-corr", "0.75", "--max-prob-diff", "0.1", "--min-topk-overlap", "0.5")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["method"] == "gradient" and "straight-through" in report["note"]
    s = report["summary"]
    assert s["top1_agreement"] == 1.0 and s["rank_corr"]["mean"] > 0.9 and s["prob_diff"]["worst"] < 0.1
    assert s["gradient_rank_corr"]["worst"] > 0.9 and s["input_x_gradient_rank_corr"]["worst"] > 0.9


def test_a_statically_quantized_copy_is_compared_white_box_even_under_occlusion(models, tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    class Reader:
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{"x": rng.normal(size=(1, 12)).astype(np.float32)} for _ in range(32)])

        def get_next(self):
            return next(self.it, None)

    d, inputs = models
    q = tmp_path / "mlp.qdq.onnx"
    quantize_static(str(d / "mlp.onnx"), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    from onnxplain import Explainer

    ref, cand = Explainer(str(d / "mlp.onnx")), Explainer(str(q))
    x = np.random.default_rng(5).normal(scale=0.7, size=(6, 12)).astype(np.float32)
    records, method, note = V.compare(ref, cand, x, method="feature_ablation")
    assert method == "feature_ablation" and "straight-through" in note
    g = [r["gradient_rank_corr"] for r in records]
    ixg = [r["input_x_gradient_rank_corr"] for r in records]
    assert min(g) > 0.8 and min(ixg) > 0.8, (g, ixg)
    # a threshold on the white-box numbers gates like the others
    only = {k: None for k in V.THRESHOLDS}
    assert V.verdict(records, dict(only, min_gradient_rank_corr=0.8))["passed"]
    assert not V.verdict(records, dict(only, min_gradient_rank_corr=1.01))["passed"]


def test_a_white_box_threshold_fails_where_no_gradient_comparison_could_be_made():
    records = [{"sample": "0", "rank_corr": 1.0, "topk_overlap": 1.0, "iou": 1.0, "prob_diff": 0.0,
                "top1_agree": True}]
    out = V.verdict(records, {k: None for k in V.THRESHOLDS} | {"min_gradient_rank_corr": 0.5})
    assert not out["passed"] and "no white-box comparison" in out["failures"][0]["reason"]


def test_a_model_planted_on_another_region_fails_with_exit_1(tmp_path):
    ref = box_model(tmp_path / "ref.onnx", (2, 8, 2, 8))
    planted = box_model(tmp_path / "planted.onnx", (9, 15, 9, 15))
    x = np.random.default_rng(0).uniform(0.6, 1.0, (4, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = invoke("validate", ref, planted, tmp_path / "x.npy", "--report", tmp_path / "rep.json")
    assert r.exit_code == 1, r.output
    assert "FAIL: min_iou" in r.output and "FAIL: min_topk_overlap" in r.output
    report = json.loads((tmp_path / "rep.json").read_text())
    assert not report["passed"] and report["summary"]["top1_agreement"] == 1.0  # same decisions, other reasons
    assert report["summary"]["iou"]["worst"] == 0.0


def test_expectations_check_the_share_of_relevance_in_a_region(tmp_path):
    model = box_model(tmp_path / "ref.onnx", (2, 8, 2, 8))
    x = np.random.default_rng(0).uniform(0.6, 1.0, (2, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ok = invoke("validate", model, tmp_path / "x.npy", "--expect", "region=2,2,8,8;min_share=0.9")
    assert ok.exit_code == 0, ok.output
    (tmp_path / "exp.json").write_text(json.dumps([{"region": [8, 8, 16, 16], "min_share": 0.5}]))
    bad = invoke("validate", model, tmp_path / "x.npy", "--expect", tmp_path / "exp.json")
    assert bad.exit_code == 1 and "FAIL: 2 of 2" in bad.output


def test_usage_errors_exit_2(models, tmp_path):
    d, inputs = models
    assert invoke("validate", d / "mlp.onnx", inputs).exit_code == 2  # one model, no --expect
    r = invoke("validate", d / "mlp.onnx", d / "copy.onnx", inputs, "--min-iou", "1.5")
    assert r.exit_code == 2 and "fraction" in r.output
    (tmp_path / "t.json").write_text('{"min_rank":0.5}')
    r = invoke("validate", d / "mlp.onnx", d / "copy.onnx", inputs, "--thresholds", tmp_path / "t.json")
    assert r.exit_code == 2 and "unknown threshold" in r.output
    assert invoke("validate", d / "mlp.onnx", inputs, "--expect", "region=1,2;min_share=2").exit_code == 2


def test_results_are_logged_per_file_and_resume_skips_them(models, tmp_path):
    d, inputs = models
    rep = tmp_path / "rep.json"
    assert invoke("validate", d / "mlp.onnx", d / "copy.onnx", inputs, "--report", rep).exit_code == 0
    log = rep.with_suffix(".jsonl")
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["input"].endswith("x0.npy")
    # An interrupted run: only the first file got done; --resume computes the other two.
    log.write_text(lines[0] + "\n")
    first = json.loads(lines[0])
    first["samples"][0]["sample"] = "from-the-log"
    log.write_text(json.dumps(first) + "\n")
    r = invoke("validate", d / "mlp.onnx", d / "copy.onnx", inputs, "--report", rep, "--resume")
    assert r.exit_code == 0 and "from-the-log" in r.output
    assert len(log.read_text().splitlines()) == 3


def test_agreement_numbers_of_identical_and_disjoint_maps():
    a = np.arange(64, dtype=float).reshape(8, 8)
    same = V.explanation_agreement(a, a.copy())
    assert same == {"rank_corr": pytest.approx(1.0), "topk_overlap": 1.0, "iou": 1.0}
    assert V.explanation_agreement(a, a[::-1, ::-1].copy())["rank_corr"] == pytest.approx(-1.0)
    corner, other = np.zeros((8, 8)), np.zeros((8, 8))
    corner[:2, :2], other[6:, 6:] = 1.0, 1.0
    far = V.explanation_agreement(corner, other, topk=4 / 64)
    assert far["topk_overlap"] == 0.0 and far["iou"] == 0.0


def test_a_quantized_copy_whose_score_saturates_is_named_in_the_note(models, tmp_path):
    # Calibrated on inputs ten times smaller than those validated: the explained logits
    # clip at the top of their integer range, where the straight-through gradient is 0.
    from onnxruntime.quantization import QuantFormat, quantize_static

    from onnxplain import Explainer

    class Reader:
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{"x": rng.normal(scale=0.1, size=(1, 12)).astype(np.float32)} for _ in range(16)])

        def get_next(self):
            return next(self.it, None)

    d, _ = models
    q = tmp_path / "mlp.narrow.onnx"
    quantize_static(str(d / "mlp.onnx"), str(q), Reader(), quant_format=QuantFormat.QDQ)
    x = np.random.default_rng(6).normal(size=(3, 12)).astype(np.float32)
    records, method, note = V.compare(Explainer(str(d / "mlp.onnx")), Explainer(str(q)), x[:1])
    assert method == "gradient" and "saturated at its quantization limit for 0" in note
    assert records[0]["gradient_rank_corr"] == 0.0  # a zero map ranks nothing
