"""Relevance methods (every LRP composite, deep Taylor, excitation backprop) on static QDQ
models, by the straight-through convention: the weights' DequantizeLinear of a constant is a
constant (the dequantized weight), each activation QuantizeLinear -> DequantizeLinear pair
passes relevance unchanged. The QDQ model's relevance then differs from its float model's
by the quantization of the activations only, and is conserved as the float model's is.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer
from onnxplain.errors import ModelError
from onnxplain.explainer import explainer_metadata
from onnxplain.methods.relevance import ZENNIT
from onnxplain.rules import quantized as Q

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")

SHAPE = (3, 10, 10)
RELEVANCE_METHODS = list(ZENNIT) + ["deep_taylor", "excitation_backprop", "contrastive_excitation_backprop"]


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3)
        self.pool = torch.nn.AvgPool2d(2)
        self.fc = torch.nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


class _Reader:
    def __init__(self, n=24):
        rng = np.random.default_rng(0)
        self._it = iter([{"input": rng.normal(size=(1,) + SHAPE).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self._it, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"float", "qdq", "qdq_per_channel", "qdq_opset17"} -> path: one small CNN and its
    static QDQ quantizations by onnxruntime's quantizer (per tensor, per output channel, and
    per channel from an opset-17 export, whose DequantizeLinear the onnx reference runtime
    does not implement: the weights' fold needs its opset-19 kernel)."""
    d = tmp_path_factory.mktemp("lrp_quantized")
    torch.manual_seed(0)
    net = SmallCNN().eval()
    paths = {"float": d / "float.onnx", "float17": d / "float17.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, opset in (("float", None), ("float17", 17)):
            torch.onnx.export(net, (torch.randn(1, *SHAPE),), str(paths[key]), dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}}, opset_version=opset)
        for key, src, per_channel in (("qdq", "float", False), ("qdq_per_channel", "float", True),
                                      ("qdq_opset17", "float17", True)):
            paths[key] = d / f"{key}.onnx"
            quantization.quantize_static(str(paths[src]), str(paths[key]), _Reader(),
                                         quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel)
    assert onnx.load(str(paths["qdq_opset17"])).opset_import[0].version == 17
    return paths


def _x(seed=1, n=3):
    # Inside the calibrated range, so that no logit is saturated by the output's quantizer.
    return np.random.default_rng(seed).normal(scale=0.7, size=(n,) + SHAPE).astype(np.float32)


def _logit_seed(e, x, cls=2):
    logits = e.predict(x)
    seed = np.zeros_like(logits)
    seed[:, cls] = logits[:, cls]
    return seed


def test_the_qdq_model_has_quantized_activations_and_folded_weights(models):
    # What the convention rests on: after loading, the weights' DequantizeLinear of a
    # constant is a constant, and the Q/DQ pairs left are the activations'.
    for key in ("qdq", "qdq_per_channel", "qdq_opset17"):
        raw = onnx.load(str(models[key]))
        assert sum(n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") for n in raw.graph.node) >= 3
        g = Explainer(str(models[key])).graph
        for n in g.nodes:
            if n.op_type in ("Conv", "Gemm"):
                assert g.constant(n.input[1]) is not None, n.name
        assert sum(n.op_type == "QuantizeLinear" for n in g.nodes) >= 3


@pytest.mark.parametrize("key", ["qdq", "qdq_per_channel", "qdq_opset17"])
@pytest.mark.parametrize("method", RELEVANCE_METHODS)
def test_relevance_of_a_qdq_model_is_close_to_the_float_models(models, key, method):
    x = _x()
    ef, eq = Explainer(str(models["float"])), Explainer(str(models[key]))
    rf = ef.attribute(x, method=method, target=2).reshape(len(x), -1).astype(np.float64)
    rq = eq.attribute(x, method=method, target=2).reshape(len(x), -1).astype(np.float64)
    assert np.all(np.isfinite(rq)) and np.all(np.abs(rq).sum(1) > 0)
    rel = np.linalg.norm(rq - rf, axis=1) / np.linalg.norm(rf, axis=1)
    corr = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(rq, rf)])
    # Measured on 3 inputs (logits' relative error 0.013-0.021): z+-based composites, deep
    # Taylor and excitation backprop 0.01-0.07, correlation >= 0.999; lrp.epsilon (which on a
    # ReLU net is input x gradient, as sensitive to rounding) 0.18-0.31, correlation >= 0.95,
    # where the straight-through input x gradient itself is 0.08-0.26 from the float model's.
    max_rel, min_corr = (0.4, 0.94) if method == "lrp.epsilon" else (0.15, 0.99)
    assert np.all(rel < max_rel) and np.all(corr > min_corr), (rel, corr)


@pytest.mark.parametrize("key", ["float", "qdq", "qdq_per_channel", "qdq_opset17"])
@pytest.mark.parametrize("method", list(ZENNIT))
def test_lrp_without_biases_sums_to_the_explained_logit_on_float_and_qdq_models(models, key, method):
    e = Explainer(str(models[key]))
    x = _x(2)
    seed = _logit_seed(e, x)
    r = e.attribute(x, method=method, target=seed, bias=False, epsilon=1e-9, stabilizer=1e-9)
    # LRP-0 in the first layer of the per-tensor QDQ model meets a unit whose bias-free
    # pre-activation cancels on the input's quantization grid (|W x| = 4e-9 in float64): its
    # relevance (0.8% of one sample's) is lost to float32 rounding, not to the convention.
    rtol = 1e-2 if method == "lrp.epsilon" else 1e-3
    np.testing.assert_allclose(r.reshape(len(x), -1).sum(1), seed.sum(1), rtol=rtol)


@pytest.mark.parametrize("key", ["float", "qdq", "qdq_per_channel"])
def test_excitation_backprop_of_a_qdq_model_sums_to_one_as_the_float_models(models, key):
    r = Explainer(str(models[key])).attribute(_x(3), method="excitation_backprop", target=1)
    assert np.all(r >= -1e-7)
    np.testing.assert_allclose(r.reshape(len(r), -1).sum(1), 1.0, rtol=1e-4)


def test_folding_the_weights_dequantize_linear_in_opset_17_leaves_the_outputs_unchanged(models):
    from onnxplain.canonize import fold_constants

    raw = onnx.load(str(models["qdq_opset17"]))
    folded = onnx.ModelProto()
    folded.CopyFrom(raw)
    folded = fold_constants(folded)
    inits = {t.name for t in folded.graph.initializer}
    weights = [n for n in raw.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    assert weights and all(n.output[0] in inits for n in weights)
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in inits for n in folded.graph.node)
    import onnxruntime as ort

    x = _x(5)

    def run(m, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"input": x})[0]

    # The same function: run as written, the folded model gives the raw one's outputs exactly.
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_array_equal(run(folded, plain), run(raw, plain))
    # onnxruntime's graph optimisations rewrite a Conv of a constant weight (not one of a
    # computed weight), which moves its float sums by an ulp and, across a rounding boundary of
    # the next quantizer, a value by a step. Measured: at most two steps of the output's
    # quantizer (one on the opset-20 export, whose weights were folded already).
    out_scale = float(numpy_helper.to_array(next(t for t in raw.graph.initializer
                                                 if t.name == raw.graph.node[-1].input[1])))
    assert np.abs(run(folded) - run(raw)).max() <= 2.01 * out_scale


def test_the_relevance_explainer_of_a_qdq_model_states_the_convention(models, tmp_path):
    spec = Explainer(str(models["qdq"])).export(tmp_path / "e.onnx", method="lrp.epsilon_plus")
    conventions = explainer_metadata(spec.model)["conventions"]
    assert conventions == [Q.RELEVANCE_CONVENTION]
    float_spec = Explainer(str(models["float"])).export(tmp_path / "f.onnx", method="lrp.epsilon_plus")
    assert explainer_metadata(float_spec.model)["conventions"] == []


def test_deeplift_on_a_qdq_model_is_still_refused_by_name(models):
    with pytest.raises(ModelError, match="quantized operator"):
        Explainer(str(models["qdq"])).attribute(_x(4, 1), method="deeplift", target=1)


# ----------------------------------------------------------------------------- per-axis activations
def _per_axis_model(runtime_scale=False):
    """x (N, 4) -> Gemm -> QuantizeLinear/DequantizeLinear per axis 1 (one scale per unit,
    uint8 from 0: the ReLU it replaces) -> Gemm -> y (N, 2); and its float model with Relu."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(4, 3)).astype(np.float32)
    w2 = rng.normal(size=(3, 2)).astype(np.float32)
    scale = np.array([0.02, 0.03, 0.05], np.float32)
    zp = np.zeros(3, np.uint8)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(zp, "zp")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])]
    if runtime_scale:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [3]))
    else:
        inits.append(numpy_helper.from_array(scale, "s"))
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])]
    q = helper.make_graph([helper.make_node("Gemm", ["x", "w1"], ["h"]),
                           helper.make_node("QuantizeLinear", ["h", "s", "zp"], ["hq"], axis=1),
                           helper.make_node("DequantizeLinear", ["hq", "s", "zp"], ["hd"], axis=1),
                           helper.make_node("Gemm", ["hd", "w2"], ["y"])], "qdq", inputs, out, inits)
    f = helper.make_graph([helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["hd"]),
                           helper.make_node("Gemm", ["hd", "w2"], ["y"])], "float", inputs[:1], out,
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    mk = lambda g: helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # noqa: E731
    return mk(q), mk(f), scale


def test_a_per_axis_activation_qdq_pair_passes_relevance_as_the_relu_it_replaces():
    qm, fm, scale = _per_axis_model()
    # Inputs whose hidden units lie on the quantization grid: then the two models agree exactly.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 4)).astype(np.float32)
    eq, ef = Explainer(qm), Explainer(fm)
    np.testing.assert_allclose(eq.predict(x), ef.predict(x), atol=0.1)
    for method in ("lrp.epsilon", "lrp.epsilon_alpha2_beta1", "excitation_backprop"):
        rq = eq.attribute(x, method=method, target=0)
        rf = ef.attribute(x, method=method, target=0)
        np.testing.assert_allclose(rq, rf, rtol=0.1, atol=0.05 * np.abs(rf).max(), err_msg=method)
    seed = np.zeros((4, 2), np.float32)
    seed[:, 1] = eq.predict(x)[:, 1]
    r = eq.attribute(x, method="lrp.epsilon", target=seed, epsilon=1e-9, bias=False)
    np.testing.assert_allclose(r.sum(1), seed.sum(1), rtol=1e-4)


def test_a_qdq_pair_with_a_scale_fed_at_run_time_is_refused_for_relevance():
    qm, _, scale = _per_axis_model(runtime_scale=True)
    e = Explainer(qm)
    x = np.ones((1, 4), np.float32)
    with pytest.raises(ModelError, match="QuantizeLinear|DequantizeLinear"):
        e.attribute({"x": x, "s": scale}, method="lrp.epsilon", target=0)


def test_inspect_reports_the_relevance_convention_on_a_qdq_model_and_deeplift_missing(models):
    import json

    from click.testing import CliRunner

    from onnxplain import cli

    result = CliRunner().invoke(cli.main, ["inspect", str(models["qdq_per_channel"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for family in list(ZENNIT) + ["deep_taylor", "excitation_backprop", "contrastive_excitation_backprop"]:
        assert report["unsupported"][family] == [], family
        assert report["rules"][family] == [
            "DequantizeLinear: relevance passed unchanged (straight-through; weights dequantized)",
            "QuantizeLinear: relevance passed unchanged (straight-through; weights dequantized)"], family
    assert report["unsupported"]["deeplift"] == ["DequantizeLinear", "QuantizeLinear"]
    assert report["rules"]["gradient"][0].startswith("DequantizeLinear: straight-through gradient")


def test_relevance_of_a_quantized_resnet_is_close_to_its_float_models(tmp_path):
    # A residual network (BatchNorm folded, residual sums and pools between Q/DQ pairs) as
    # onnxruntime's quantizer writes it from an opset-17 export, per channel.
    import zoo

    model = zoo.build("resnet")
    src = zoo.export(model, tmp_path / "resnet.onnx", "torchscript")
    dst = tmp_path / "resnet.qdq.onnx"
    shape = type(model).shape
    reader = _Reader()
    reader._it = iter([{"input": np.random.default_rng(i).normal(size=(1,) + shape).astype(np.float32)}
                       for i in range(24)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.quantize_static(str(src), str(dst), reader, quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=True)
    x = np.random.default_rng(20).normal(scale=0.7, size=(2,) + shape).astype(np.float32)
    ef, eq = Explainer(str(src)), Explainer(str(dst))
    # Measured on 2 inputs: z+ and gamma composites relative error 0.07-0.26, correlation >=
    # 0.96; excitation backprop and deep Taylor 0.01-0.06, >= 0.994.
    for method, (max_rel, min_corr) in {"lrp.epsilon_plus": (0.4, 0.95), "lrp.epsilon_gamma_box": (0.4, 0.95),
                                        "excitation_backprop": (0.15, 0.99), "deep_taylor": (0.15, 0.99)}.items():
        rows = []
        for e in (ef, eq):
            rows.append(np.concatenate([e.attribute(x[i:i + 1], method=method, target=3).reshape(1, -1)
                                        for i in range(len(x))]).astype(np.float64))
        rf, rq = rows
        rel = np.linalg.norm(rq - rf, axis=1) / np.linalg.norm(rf, axis=1)
        corr = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(rq, rf)])
        assert np.all(rel < max_rel) and np.all(corr > min_corr), (method, rel, corr)
