"""Multi-pass state kept on the device (onnxplain.resident): integrated gradients' steps and
SmoothGrad's noisy copies built inside the explainer from values bound once with
onnxruntime I/O binding, their attributions summed per sample in the graph. No GPU here:
the same path runs with CPU OrtValues (ONNXPLAIN_RESIDENT=1) and must give what the
plain path gives, which the Captum tests pin. Also: the batch halves when the device runs
out of memory."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxplain import Explainer, resident
from onnxplain.errors import InputError
from onnxplain.runtime import OutOfMemory, Session, chunked


@pytest.fixture
def spy(monkeypatch):
    """Counts the runs of resident programs (so a test knows which path it measured)."""
    calls = []
    real = resident.Program.run

    def run(self, *a, **k):
        calls.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(resident.Program, "run", run)
    return calls


def _both(monkeypatch, spy, make, x, **kw):
    monkeypatch.setenv("ONNXPLAIN_RESIDENT", "0")
    plain = make().attribute(x, **kw)
    assert not spy
    monkeypatch.setenv("ONNXPLAIN_RESIDENT", "1")
    bound = make().attribute(x, **kw)
    assert spy, "the resident path did not run"
    return plain, bound


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_integrated_gradients_on_the_device_equal_the_plain_path(monkeypatch, spy, exported, exporter):
    _model, path = exported("resnet", exporter)
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    plain, bound = _both(monkeypatch, spy, lambda: Explainer(path), x, method="integrated_gradients",
                         target=[1, 2, 0], n_steps=16, baseline=0.1)
    assert bound.shape == plain.shape == x.shape
    np.testing.assert_allclose(bound, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("base", ["gradient", "input_x_gradient", "guided_backprop"])
def test_smoothgrad_on_the_device_equals_the_plain_path(monkeypatch, spy, exported, kind, base):
    _model, path = exported("vgg", "torchscript")
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    plain, bound = _both(monkeypatch, spy, lambda: Explainer(path), x, method=kind, target=3, n_samples=6,
                         base=base, seed=4)
    scale = np.abs(plain).max()
    assert scale > 0
    np.testing.assert_allclose(bound, plain, rtol=1e-4, atol=1e-5 * scale)


def _two_input_model(path):
    """y = sum(a * b, axis 1) + sum(a, axis 1): two float inputs, one attributed at a time."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 5])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])
    nodes = [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Mul", ["ab", "a"], ["aab"]),
             helper.make_node("ReduceSum", ["aab"], ["y"], keepdims=1, axes=[1])]
    m = helper.make_model(helper.make_graph(nodes, "two", [a, b], [y]), opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 7
    onnx.save(m, str(path))
    return path


def test_integrated_gradients_of_two_inputs_on_the_device_are_exact(monkeypatch, spy, tmp_path):
    # y = a^2 b along the path t(a, b): IG's sums are integrals of polynomials, which
    # Gauss-Legendre with 8 points integrates exactly; the closed form is the reference.
    path = _two_input_model(tmp_path / "two.onnx")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
    monkeypatch.setenv("ONNXPLAIN_RESIDENT", "1")
    got = Explainer(path).attribute({"a": a, "b": b}, method="integrated_gradients", target=0, n_steps=8,
                                    wrt=["a", "b"])
    assert spy
    # d/da (t^3 a^2 b) = 2 t^2 a b -> integral over t of 2 t^2 a b * a = (2/3) a^2 b; for b: (1/3) a^2 b.
    np.testing.assert_allclose(got["a"], 2.0 / 3.0 * a * a * b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["b"], 1.0 / 3.0 * a * a * b, rtol=1e-5, atol=1e-6)


def test_a_layer_or_a_non_batch_first_layout_takes_the_plain_path(monkeypatch, spy, exported):
    _model, path = exported("vgg", "torchscript")
    e = Explainer(path)
    layer = next(n.output[0] for n in e.graph.nodes if n.op_type == "Relu")
    x = np.random.default_rng(3).normal(size=(1, 3, 16, 16)).astype(np.float32)
    monkeypatch.setenv("ONNXPLAIN_RESIDENT", "1")
    out = e.attribute(x, method="integrated_gradients", target=1, n_steps=4, layer=layer)
    assert not spy and np.isfinite(out).all() and np.abs(out).sum() > 0


def test_bound_runs_equal_plain_runs_with_cpu_values():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    m = helper.make_model(helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "m", [x, w], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = Session(m, ["CPUExecutionProvider"])
    assert s.device == "cpu"
    xs, ws = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.0, -2.0, 0.5], np.float32)
    resident_w = s.on_device(ws)
    for _ in range(2):  # the bound value is reused, not re-sent
        np.testing.assert_array_equal(s.run_bound({"w": resident_w}, {"x": xs}, ["y"])["y"], xs * ws)


class _Runner:
    def __init__(self, rows, static=None):
        self.rows, self.static = rows, static

    def rows_per_run(self, cap=None):
        return self.rows


def test_a_chunk_that_runs_out_of_device_memory_is_halved_and_nothing_is_lost():
    seen = []

    def run(start, stop):
        if stop - start > 3:
            raise OutOfMemory("out of memory: Failed to allocate memory for requested buffer")
        seen.append((start, stop))
        return stop - start

    chunks = list(chunked(_Runner(16), 21, run, None, None))
    assert [c[:2] for c in chunks] == seen
    covered = np.concatenate([np.arange(s, e) for s, e, _ in chunks])
    np.testing.assert_array_equal(covered, np.arange(21))  # every row once, in order
    assert max(e - s for s, e, _ in chunks) <= 3


def test_out_of_memory_at_one_row_or_a_fixed_batch_is_a_typed_error():
    def run(start, stop):
        raise OutOfMemory("out of memory: Failed to allocate memory")

    with pytest.raises(InputError, match="memory budget"):
        list(chunked(_Runner(4), 8, run, None, None))
    with pytest.raises(InputError, match="memory budget"):
        list(chunked(_Runner(4, static=4), 8, run, None, None))


def test_onnxruntime_allocation_failures_are_out_of_memory(monkeypatch):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "m", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = Session(m, ["CPUExecutionProvider"])

    class Failing:
        def run(self, *a, **k):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for "
                               "requested buffer of size 123")

    s.session = Failing()
    with pytest.raises(OutOfMemory, match="Failed to allocate"):
        s.run({"x": np.ones(2, np.float32)})


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_occlusion_masks_made_on_the_device_score_as_the_plain_path(monkeypatch, exported, exporter):
    _model, path = exported("mobilenet", exporter)
    x = np.random.default_rng(5).normal(size=(2, 3, 16, 16)).astype(np.float32)
    calls = []
    real = Session.run_bound
    monkeypatch.setattr(Session, "run_bound", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setenv("ONNXPLAIN_RESIDENT", "0")
    plain = Explainer(path).attribute(x, method="occlusion", target=[2, 4], window=(3, 5, 4), strides=(1, 3, 2),
                                      baseline=0.25)
    assert not calls
    monkeypatch.setenv("ONNXPLAIN_RESIDENT", "1")
    bound = Explainer(path).attribute(x, method="occlusion", target=[2, 4], window=(3, 5, 4), strides=(1, 3, 2),
                                      baseline=0.25)
    assert calls
    scale = np.abs(plain).max()
    assert scale > 0
    np.testing.assert_allclose(bound, plain, rtol=1e-4, atol=1e-5 * scale)


def test_occlusion_on_the_device_holds_the_other_inputs(monkeypatch, tmp_path):
    # y = sum(a^2 b): occluding a_i (baseline 0) drops the score by a_i^2 b_i exactly.
    path = _two_input_model(tmp_path / "two.onnx")
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    monkeypatch.setenv("ONNXPLAIN_RESIDENT", "1")
    got = Explainer(path).attribute({"a": a, "b": b}, method="occlusion", target=0, wrt=["a"], window=(1,))
    np.testing.assert_allclose(got, a * a * b, rtol=1e-5, atol=1e-6)


def test_a_model_that_takes_one_row_at_a_time_falls_back_to_the_host_path(monkeypatch, tmp_path):
    # A state fixed at batch 1 (h: (1, 4)) concatenated to the input: onnxruntime refuses more
    # rows than one, as a GRU's initial_h does; the host path then runs the rows one by one.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])
    nodes = [helper.make_node("Concat", ["x", "h"], ["xh"], axis=1), helper.make_node("Mul", ["xh", "xh"], ["sq"]),
             helper.make_node("ReduceSum", ["sq"], ["y"], keepdims=1, axes=[1])]
    m = helper.make_model(helper.make_graph(nodes, "state", [x, h], [y]), opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 7
    onnx.save(m, str(tmp_path / "state.onnx"))
    xs = np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)
    feeds = {"x": xs, "h": np.ones((1, 4), np.float32)}
    monkeypatch.setenv("ONNXPLAIN_RESIDENT", "1")
    e = Explainer(tmp_path / "state.onnx")
    occ = e.attribute(feeds, method="occlusion", target=0, window=(1,))
    np.testing.assert_allclose(occ, xs * xs, rtol=1e-6)  # occluding x_i to 0 drops x_i^2
    ig = e.attribute(feeds, method="integrated_gradients", target=0, n_steps=4)
    np.testing.assert_allclose(ig, xs * xs, rtol=1e-5)  # IG of a quadratic from 0: x_i^2
