"""Gradient rules of element-wise operators agree with finite differences and with torch.

Most cases run through the public harness (`check_gradient`: graph inputs share the
symbolic batch axis). Cases whose differentiated operands have no batch axis (a bias of
shape (4,), a scalar clip bound, normalisation parameters) compile the explainer directly
from the model, whose other inputs keep a symbolic batch axis.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gradcheck import check_gradient, node_model, numeric_gradient

from onnxplain.compile import SEED, Composite, compile_explainer
from onnxplain.graph import Graph

F32 = np.float32


def normal(rng, *shape, scale=1.0):
    return np.asarray(scale * rng.normal(size=shape), dtype=F32)


def positive(rng, *shape, low=0.3, high=2.0):
    return np.asarray(rng.uniform(low, high, size=shape), dtype=F32)


def away(x, kinks=(0.0,), margin=0.1):
    """x with every element at least `margin` from each kink (finite differences straddle
    no kink, even with the float32 step of 1e-2)."""
    x = np.array(x, dtype=F32, copy=True)
    for _ in range(20):
        near = np.zeros(x.shape, bool)
        for k in kinks:
            near |= np.abs(x - k) < margin
        if not near.any():
            return x
        x[near] += 2.5 * margin
    raise AssertionError("could not move the inputs away from the kinks")


@dataclass
class Case:
    id: str
    op: str
    make: object  # (batch, rng) -> (inputs, consts)
    attrs: dict = field(default_factory=dict)
    opset: int = 17
    n_outputs: int = 1


def unary(op, make_x=normal, attrs=None, opset=17, id=None, shape=(3, 4)):
    return Case(id or op.lower(), op, lambda n, r: ({"x": make_x(r, n, *shape)}, {}), attrs or {}, opset)


def kinked(kinks, margin=0.1, scale=1.0):
    return lambda r, *shape: away(normal(r, *shape, scale=scale), kinks, margin)


def binary(op, id, x_shape, y_shape=None, c_shape=None, const_first=False, make=normal, make_other=None):
    """A binary op with x variable and a second operand that is variable (y, batched) or constant (c)."""
    make_other = make_other or make

    def build(n, r):
        inputs = {"x": make(r, n, *x_shape)}
        consts = {}
        if y_shape is not None:
            inputs["y"] = make_other(r, n, *y_shape)
        else:
            consts["c"] = make_other(r, *c_shape)
        return inputs, consts

    attrs = {"_order": ["c", "x"]} if const_first else {}
    return Case(id, op, build, attrs)


def _clip_case(id, lo, hi):
    def build(n, r):
        x = away(normal(r, n, 3, 4, scale=2.0), [v for v in (lo, hi) if v is not None])
        consts = {}
        if lo is not None:
            consts["lo"] = np.array(lo, F32)
        if hi is not None:
            consts["hi"] = np.array(hi, F32)
        return {"x": x}, consts

    order = ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""]
    while order[-1] == "":
        order.pop()
    return Case(id, "Clip", build, {"_order": order})


def _bn_case(id, shape, eps):
    def build(n, r):
        c = shape[0]
        return {"x": normal(r, n, *shape)}, {
            "scale": normal(r, c), "bias": normal(r, c), "mean": normal(r, c), "var": positive(r, c)}

    return Case(id, "BatchNormalization", build, {"epsilon": eps})


def _layer_norm_case(id, shape, axis, eps=1e-5, with_bias=True):
    def build(n, r):
        norm_shape = ((n,) + shape)[axis:] if axis >= 0 else shape[len(shape) + axis:]
        consts = {"scale": normal(r, *norm_shape)}
        if with_bias:
            consts["bias"] = normal(r, *norm_shape)
        return {"x": normal(r, n, *shape, scale=2.0)}, consts

    return Case(id, "LayerNormalization", build, {"axis": axis, "epsilon": eps})


CASES = [
    # arithmetic with broadcasting; either operand constant or variable
    binary("Add", "add_const_vector_(3,4)+(4,)", (3, 4), c_shape=(4,)),
    binary("Add", "add_const_column_(2,3,4)+(3,1)", (2, 3, 4), c_shape=(3, 1)),
    binary("Add", "add_const_scalar", (3, 4), c_shape=()),
    binary("Add", "add_const_first", (3, 4), c_shape=(4,), const_first=True),
    binary("Add", "add_both_variable", (3, 4), y_shape=(3, 4)),
    binary("Add", "add_both_variable_broadcast_(3,4)+(1,4)", (3, 4), y_shape=(1, 4)),
    binary("Add", "add_both_variable_broadcast_(1,4)+(3,1)", (1, 4), y_shape=(3, 1)),
    binary("Sub", "sub_const_vector", (3, 4), c_shape=(4,)),
    binary("Sub", "sub_const_first", (2, 3, 4), c_shape=(3, 1), const_first=True),
    binary("Sub", "sub_const_scalar", (3, 4), c_shape=()),
    binary("Sub", "sub_both_variable_broadcast", (3, 4), y_shape=(3, 1)),
    binary("Mul", "mul_const_vector", (3, 4), c_shape=(4,)),
    binary("Mul", "mul_const_column_first", (2, 3, 4), c_shape=(3, 1), const_first=True),
    binary("Mul", "mul_const_scalar", (3, 4), c_shape=()),
    binary("Mul", "mul_both_variable", (3, 4), y_shape=(3, 4)),
    binary("Mul", "mul_both_variable_broadcast", (1, 4), y_shape=(3, 1)),
    Case("mul_x_by_itself", "Mul", lambda n, r: ({"x": normal(r, n, 3, 4)}, {}), {"_order": ["x", "x"]}),
    binary("Div", "div_by_const_vector", (3, 4), c_shape=(4,), make_other=kinked([0], 0.3)),
    binary("Div", "div_const_by_x", (3, 4), c_shape=(4,), const_first=True, make=kinked([0], 0.3)),
    binary("Div", "div_by_const_scalar", (3, 4), c_shape=(), make_other=positive),
    binary("Div", "div_both_variable", (3, 4), y_shape=(3, 4), make_other=kinked([0], 0.3)),
    binary("Div", "div_both_variable_broadcast", (3, 4), y_shape=(1, 4), make_other=positive),
    Case("sum_three_broadcast", "Sum", lambda n, r: (
        {"x": normal(r, n, 3, 4), "y": normal(r, n, 1, 4)}, {"c": normal(r, 4)})),
    Case("sum_single", "Sum", lambda n, r: ({"x": normal(r, n, 3, 4)}, {})),
    Case("mean_three_broadcast", "Mean", lambda n, r: (
        {"x": normal(r, n, 3, 4), "y": normal(r, n, 3, 1)}, {"c": normal(r, 4)})),
    # element-wise extrema: operands kept apart so no tie is within a step
    Case("max_two_variable", "Max", lambda n, r: _apart(r, n, (3, 4), (3, 4))),
    Case("max_three_broadcast_with_const", "Max", lambda n, r: _apart(r, n, (3, 4), (1, 4), const=(4,))),
    Case("min_two_variable", "Min", lambda n, r: _apart(r, n, (3, 4), (3, 4))),
    Case("min_variable_and_const_scalar", "Min", lambda n, r: _apart(r, n, (3, 4), None, const=())),
    Case("max_single", "Max", lambda n, r: ({"x": normal(r, n, 3, 4)}, {})),
    Case("max_tie_with_itself", "Max", lambda n, r: ({"x": normal(r, n, 3, 4)}, {}), {"_order": ["x", "x"]}),
    # powers
    binary("Pow", "pow_const_scalar_exponent_3", (3, 4), c_shape=(), make_other=lambda r, *s: np.array(3.0, F32)),
    binary("Pow", "pow_const_exponent_2", (3, 4), c_shape=(), make_other=lambda r, *s: np.array(2.0, F32)),
    binary("Pow", "pow_const_exponent_half", (3, 4), c_shape=(), make=positive,
           make_other=lambda r, *s: np.array(0.5, F32)),
    binary("Pow", "pow_const_exponent_vector", (3, 4), make=positive, c_shape=(4,)),
    binary("Pow", "pow_int_exponent", (3, 4), c_shape=(), make_other=lambda r, *s: np.array(3, np.int64)),
    binary("Pow", "pow_const_exponent_0", (3, 4), c_shape=(), make_other=lambda r, *s: np.array(0.0, F32)),
    binary("Pow", "pow_const_exponent_1", (3, 4), c_shape=(), make_other=lambda r, *s: np.array(1.0, F32)),
    binary("Pow", "pow_both_variable", (3, 4), y_shape=(3, 4), make=positive),
    binary("Pow", "pow_const_base_variable_exponent", (3, 4), c_shape=(4,), const_first=True,
           make=normal, make_other=positive),
    # d(0^p)/dp = 0 for p > 0 (torch's convention), not 0 * log 0 = NaN
    binary("Pow", "pow_exponent_gradient_at_zero_base", (3, 4), c_shape=(4,), const_first=True, make=positive,
           make_other=lambda r, *s: np.array([0.0, 0.5, 1.0, 2.0], F32)),
    # smooth unary functions
    unary("Neg"),
    unary("Reciprocal", kinked([0], 0.3)),
    unary("Abs", kinked([0])),
    unary("Exp"),
    unary("Log", positive),
    unary("Sqrt", positive),
    unary("Sin", id="sin", make_x=lambda r, *s: normal(r, *s, scale=2.0)),
    unary("Cos", id="cos", make_x=lambda r, *s: normal(r, *s, scale=2.0)),
    unary("Erf"),
    unary("Sigmoid", lambda r, *s: normal(r, *s, scale=3.0)),
    unary("Tanh"),
    unary("Softplus", lambda r, *s: normal(r, *s, scale=3.0)),
    unary("Softsign", lambda r, *s: normal(r, *s, scale=3.0)),
    unary("Gelu", lambda r, *s: normal(r, *s, scale=2.0), opset=20, id="gelu_exact"),
    unary("Gelu", lambda r, *s: normal(r, *s, scale=2.0), {"approximate": "tanh"}, opset=20, id="gelu_tanh"),
    # piecewise activations, inputs kept off their kinks
    unary("Relu", kinked([0])),
    unary("LeakyRelu", kinked([0]), id="leaky_relu_default_alpha"),
    unary("LeakyRelu", kinked([0]), {"alpha": 0.2}, id="leaky_relu_alpha_0.2"),
    unary("ThresholdedRelu", kinked([0.5], scale=1.5), {"alpha": 0.5}, id="thresholded_relu_alpha_0.5"),
    unary("HardSigmoid", kinked([-2.5, 2.5], scale=3.0), id="hard_sigmoid_default"),
    unary("HardSigmoid", kinked([-3.0, 3.0], scale=3.0), {"alpha": 1 / 6, "beta": 0.5}, id="hard_sigmoid_torch"),
    unary("HardSigmoid", kinked([-2.0, 0.5], scale=2.0), {"alpha": 0.4, "beta": 0.8}, id="hard_sigmoid_alpha_beta"),
    unary("HardSwish", kinked([-3.0, 3.0], scale=3.0), id="hard_swish"),
    unary("Elu", kinked([0], scale=2.0), id="elu_default"),
    unary("Elu", kinked([0], scale=2.0), {"alpha": 0.5}, id="elu_alpha_0.5"),
    unary("Selu", kinked([0], scale=2.0), id="selu_default"),
    unary("Selu", kinked([0], scale=2.0), {"alpha": 1.5, "gamma": 2.0}, id="selu_alpha_gamma"),
    unary("Celu", kinked([0], scale=2.0), {"alpha": 2.0}, id="celu_alpha_2"),
    Case("prelu_const_channel_slope", "PRelu", lambda n, r: (
        {"x": away(normal(r, n, 3, 2, 2))}, {"slope": normal(r, 3, 1, 1)})),
    Case("prelu_const_single_slope", "PRelu", lambda n, r: ({"x": away(normal(r, n, 3, 4))}, {"slope": normal(r, 1)})),
    Case("prelu_both_variable", "PRelu", lambda n, r: (
        {"x": away(normal(r, n, 3, 4)), "slope": normal(r, n, 3, 4)}, {})),
    _clip_case("clip_min_max", -1.0, 1.0),
    _clip_case("clip_min_only", -0.5, None),
    _clip_case("clip_max_only", None, 0.5),
    _clip_case("clip_no_bounds", None, None),
    # selection and passing
    Case("where_const_condition_broadcast", "Where", lambda n, r: (
        {"x": normal(r, n, 3, 4), "y": normal(r, n, 1, 4)}, {"cond": r.random((3, 4)) > 0.5}),
        {"_order": ["cond", "x", "y"]}),
    Case("where_variable_condition_const_other", "Where", lambda n, r: (
        {"cond": r.random((n, 3, 4)) > 0.5, "x": normal(r, n, 3, 4)}, {"c": normal(r, 4)}),
        {"_order": ["cond", "x", "c"]}),
    unary("Identity"),
    Case("dropout_inference_with_mask_output", "Dropout", lambda n, r: (
        {"x": normal(r, n, 3, 4)}, {"ratio": np.array(0.3, F32)}), n_outputs=2),
    # normalisations
    _bn_case("batch_norm_rank4", (3, 4, 5), 1e-5),
    _bn_case("batch_norm_rank2_epsilon_0.1", (3,), 0.1),
    _bn_case("batch_norm_rank3", (3, 5), 1e-3),
    _layer_norm_case("layer_norm_last_axis", (3, 6), -1),
    _layer_norm_case("layer_norm_axis_1", (3, 4), 1),
    _layer_norm_case("layer_norm_negative_axis_-2_epsilon", (3, 4), -2, eps=0.3),
    _layer_norm_case("layer_norm_no_bias", (2, 5), -1, with_bias=False),
    Case("layer_norm_opset_18_axes_as_inputs", "LayerNormalization", lambda n, r: (
        {"x": normal(r, n, 3, 4, scale=2.0)}, {"scale": normal(r, 3, 4)}), {"axis": 1}, opset=18),
    Case("instance_norm_opset_21", "InstanceNormalization", lambda n, r: (
        {"x": normal(r, n, 2, 6)}, {"scale": normal(r, 2), "bias": normal(r, 2)}), opset=21),
    Case("instance_norm", "InstanceNormalization", lambda n, r: (
        {"x": normal(r, n, 3, 4, 5, scale=2.0)}, {"scale": normal(r, 3), "bias": normal(r, 3)}), {"epsilon": 1e-3}),
    Case("softmax_last_axis", "Softmax", lambda n, r: ({"x": normal(r, n, 3, 5)}, {})),
    Case("softmax_axis_1", "Softmax", lambda n, r: ({"x": normal(r, n, 3, 5)}, {}), {"axis": 1}),
    Case("softmax_negative_axis_-3", "Softmax", lambda n, r: ({"x": normal(r, n, 3, 2, 4)}, {}), {"axis": -3}),
    Case("log_softmax_last_axis", "LogSoftmax", lambda n, r: ({"x": normal(r, n, 3, 5)}, {})),
    Case("log_softmax_axis_1", "LogSoftmax", lambda n, r: ({"x": normal(r, n, 3, 5)}, {}), {"axis": 1}),
]


def _apart(rng, n, x_shape, y_shape, const=None):
    """Operands for Max/Min whose elements differ by at least 0.1 wherever they meet."""
    x = normal(rng, n, *x_shape)
    inputs, consts = {"x": x}, {}
    if y_shape is not None:
        inputs["y"] = normal(rng, n, *y_shape)
    if const is not None:
        consts["c"] = normal(rng, *const)
    for _ in range(50):
        ops = list(inputs.values()) + list(consts.values())
        shape = np.broadcast_shapes(*[o.shape for o in ops])
        stack = np.stack([np.broadcast_to(o, shape) for o in ops])
        gaps = np.sort(stack, axis=0)
        if np.all(np.diff(gaps, axis=0) > 0.1):
            return inputs, consts
        inputs = {k: normal(rng, *v.shape, scale=2.0) for k, v in inputs.items()}
    raise AssertionError("no well-separated operands found")


def _rng(name: str, batch: int):
    return np.random.default_rng(zlib.crc32(f"{name}/{batch}".encode()))


def _float_inputs(inputs):
    return [k for k, v in inputs.items() if v.dtype.kind == "f"]


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradient_matches_finite_differences(case, batch):
    inputs, consts = case.make(batch, _rng(case.id, batch))
    model = node_model(case.op, inputs, case.attrs, consts, n_outputs=case.n_outputs, opset=case.opset)
    for name in _float_inputs(inputs):
        check_gradient(model, inputs, wrt=name)


# ------------------------------------------------------------- operands without a batch axis


def static_model(op, inputs, consts=None, attrs=None, batched=("x",), opset=17):
    """One-node model where the inputs named in `batched` have a symbolic batch axis and
    the others (biases, slopes, bounds, parameters) have their static shapes."""
    model = node_model(op, inputs, attrs, consts, opset=opset)
    for vi in model.graph.input:
        if vi.name in inputs and vi.name not in batched:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for s in inputs[vi.name].shape:
                shape.dim.add().dim_value = s
    del model.graph.value_info[:]
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")
    return model


def explain(model, feeds, seed_rng=0):
    """Compile the gradient explainer of the model's first output w.r.t. its float inputs;
    return (seed, {input: gradient})."""
    graph = Graph(model)
    out = graph.outputs[0]
    wrt = [k for k in graph.inputs if graph.is_float(k)]
    spec = compile_explainer(graph, Composite("gradient"), wrt, out)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(spec.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = _forward(model, feeds)
    seed = np.random.default_rng(seed_rng).normal(size=y.shape).astype(F32)
    got = sess.run([spec.attributions[w] for w in wrt], {**feeds, SEED: seed})
    return seed, dict(zip(wrt, got))


def _forward(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def check_static(op, inputs, consts=None, attrs=None, batched=("x",), opset=17):
    model = static_model(op, inputs, consts, attrs, batched, opset)
    seed, got = explain(model, inputs)
    assert set(got) == set(_float_inputs(inputs))
    for name, g in got.items():
        assert g.shape == inputs[name].shape, name
        flat, num, double = numeric_gradient(model, inputs, name, seed)
        tol = 1e-4 if double else 3e-2
        np.testing.assert_allclose(g.reshape(-1)[flat], num, rtol=tol, atol=tol, err_msg=f"gradient w.r.t. {name}")


STATIC = {
    "add_variable_vector_(N,3,4)+(4,)": ("Add", {"x": (3, 4), "y": (4,)}, {}, {}),
    "add_variable_column_(N,3,4)+(3,1)": ("Add", {"x": (3, 4), "y": (3, 1)}, {}, {}),
    "add_variable_(N,2,3,4)+(3,1)": ("Add", {"x": (2, 3, 4), "y": (3, 1)}, {}, {}),
    "add_variable_scalar": ("Add", {"x": (3, 4), "y": ()}, {}, {}),
    "sub_variable_vector_first": ("Sub", {"y": (4,), "x": (3, 4)}, {}, {}),
    "mul_variable_column": ("Mul", {"x": (3, 4), "y": (3, 1)}, {}, {}),
    "mul_variable_scalar": ("Mul", {"x": (3, 4), "y": ()}, {}, {}),
    "div_by_variable_vector": ("Div", {"x": (3, 4), "y": (4,)}, {}, {}),
    "div_variable_vector_by_x": ("Div", {"y": (4,), "x": (3, 4)}, {}, {}),
    "sum_variable_vector_and_column": ("Sum", {"x": (3, 4), "y": (4,), "z": (3, 1)}, {}, {}),
    "max_variable_vector": ("Max", {"x": (3, 4), "y": (4,)}, {}, {}),
    "min_variable_column": ("Min", {"x": (3, 4), "y": (3, 1)}, {}, {}),
    "pow_variable_exponent_vector": ("Pow", {"x": (3, 4), "y": (4,)}, {}, {}),
    "prelu_variable_channel_slope": ("PRelu", {"x": (3, 2, 2), "slope": (3, 1, 1)}, {}, {}),
    "where_variable_column_and_vector": ("Where", {"x": (3, 1), "y": (4,)}, {"cond": (3, 4)}, {}),
    "clip_variable_bounds": ("Clip", {"x": (3, 4), "lo": (), "hi": ()}, {}, {}),
    "batch_norm_variable_parameters": (
        "BatchNormalization", {"x": (3, 2, 2), "scale": (3,), "bias": (3,), "mean": (3,), "var": (3,)}, {},
        {"epsilon": 1e-3}),
    "layer_norm_variable_scale_bias": ("LayerNormalization", {"x": (3, 4), "scale": (4,), "bias": (4,)}, {}, {}),
    "layer_norm_variable_broadcast_scale_axis_1": (
        "LayerNormalization", {"x": (3, 4), "scale": (1, 4), "bias": (3, 1)}, {}, {"axis": 1}),
    "instance_norm_variable_parameters": (
        "InstanceNormalization", {"x": (3, 4, 5), "scale": (3,), "bias": (3,)}, {}, {"epsilon": 1e-3}),
}


def _static_inputs(op, shapes, batch, rng):
    inputs = {}
    for name, shape in shapes.items():
        full = (batch,) + shape if name == "x" else shape
        inputs[name] = normal(rng, *full, scale=2.0)
    if op == "Pow":
        inputs["x"] = positive(rng, *inputs["x"].shape)
    elif op == "Div":
        inputs = {k: away(v, [0], 0.3) for k, v in inputs.items()}
    elif op == "BatchNormalization":
        inputs["var"] = positive(rng, *shapes["var"])
    elif op == "PRelu":
        inputs["x"] = away(inputs["x"])
    elif op == "Clip":
        inputs["lo"], inputs["hi"] = np.array(-1.0, F32), np.array(1.5, F32)
        inputs["x"] = away(inputs["x"], [-1.0, 1.5])
    elif op in ("Max", "Min"):
        x, y = inputs["x"], inputs["y"]
        gap = np.abs(x - y) < 0.1
        inputs["x"] = np.where(gap, x + 0.3, x).astype(F32)
    return inputs


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
@pytest.mark.parametrize("case", list(STATIC), ids=list(STATIC))
def test_gradient_wrt_operands_without_batch_axis(case, batch):
    op, shapes, const_shapes, attrs = STATIC[case]
    rng = _rng(case, batch)
    inputs = _static_inputs(op, shapes, batch, rng)
    consts = {k: rng.random(s) > 0.5 for k, s in const_shapes.items()}
    attrs = dict(attrs)
    if op == "Where":
        attrs["_order"] = ["cond", "x", "y"]
    check_static(op, inputs, consts, attrs)


# ---------------------------------------------------------------------- agreement with torch


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("op,axis", [("Softmax", 1), ("Softmax", -1), ("LogSoftmax", 1), ("LogSoftmax", -2)],
                         ids=["softmax_axis_1", "softmax_axis_-1", "log_softmax_axis_1", "log_softmax_axis_-2"])
def test_softmax_gradient_equals_torch_autograd(op, axis):
    torch = _torch()
    rng = np.random.default_rng(7)
    x = normal(rng, 3, 5, 4, scale=2.0)
    seed, got = explain(static_model(op, {"x": x}, attrs={"axis": axis}), {"x": x}, seed_rng=11)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    fn = torch.softmax if op == "Softmax" else torch.log_softmax
    (fn(xt, dim=axis) * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(got["x"], xt.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis", [-1, 2, 1], ids=["axis_-1", "axis_2", "axis_1"])
def test_layer_norm_gradient_equals_torch_autograd(axis):
    torch = _torch()
    rng = np.random.default_rng(3)
    x = normal(rng, 3, 4, 6, scale=3.0)
    norm_shape = x.shape[axis:]
    scale, bias = normal(rng, *norm_shape), normal(rng, *norm_shape)
    feeds = {"x": x, "scale": scale, "bias": bias}
    model = static_model("LayerNormalization", feeds, attrs={"axis": axis, "epsilon": 1e-3})
    seed, got = explain(model, feeds, seed_rng=5)
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in feeds.items()}
    y = torch.nn.functional.layer_norm(t["x"], norm_shape, t["scale"], t["bias"], eps=1e-3)
    (y * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    for k in feeds:
        np.testing.assert_allclose(got[k], t[k].grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)


def test_clip_passes_gradient_on_its_bounds_like_torch_clamp():
    torch = _torch()
    x = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]], F32)
    model = node_model("Clip", {"x": x}, consts={"lo": np.array(-1.0, F32), "hi": np.array(1.0, F32)})
    seed, got = explain(model, {"x": x})
    xt = torch.tensor(x, requires_grad=True)
    (torch.clamp(xt, -1.0, 1.0) * torch.tensor(seed)).sum().backward()
    np.testing.assert_array_equal(got["x"], xt.grad.numpy())


def test_max_splits_gradient_between_ties_like_torch_maximum():
    torch = _torch()
    x = np.array([[1.0, 2.0, 3.0]], F32)
    y = np.array([[1.0, 5.0, 0.0]], F32)
    model = node_model("Max", {"x": x, "y": y})
    seed, got = explain(model, {"x": x, "y": y})
    xt, yt = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    (torch.maximum(xt, yt) * torch.tensor(seed)).sum().backward()
    np.testing.assert_allclose(got["x"], xt.grad.numpy())
    np.testing.assert_allclose(got["y"], yt.grad.numpy())


def test_relu_family_passes_nothing_at_zero_like_torch():
    torch = _torch()
    x = np.array([[-1.0, 0.0, 1.0]], F32)
    for op, fn in [("Relu", torch.relu), ("LeakyRelu", lambda t: torch.nn.functional.leaky_relu(t, 0.01)),
                   ("Abs", torch.abs)]:
        seed, got = explain(node_model(op, {"x": x}), {"x": x})
        xt = torch.tensor(x, requires_grad=True)
        (fn(xt) * torch.tensor(seed)).sum().backward()
        np.testing.assert_allclose(got["x"], xt.grad.numpy(), err_msg=op)


# ------------------------------------------------------------------------- casts and chains


def _chain(nodes, x, opset=17):
    """A model from input 'x' (batch axis symbolic) to output 'y' through `nodes`."""
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"] + list(x.shape[1:]))
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = helper.make_model(helper.make_graph(nodes, "chain", [x_info], [y_info]),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def _constant(name, value):
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value, F32)))


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
def test_cast_to_double_and_back_passes_the_gradient(batch):
    x = normal(np.random.default_rng(batch), batch, 3, 4)
    model = _chain([
        helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
        helper.make_node("Sin", ["d"], ["s"]),
        helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT),
    ], x)
    check_gradient(model, {"x": x})


def test_cast_through_an_integer_has_zero_gradient():
    x = away(normal(np.random.default_rng(0), 2, 5, scale=3.0), np.arange(-10.0, 11.0), 0.1)
    model = _chain([
        helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
        helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["f", "x"], ["y"]),
    ], x)
    check_gradient(model, {"x": x})


def test_erf_based_gelu_as_torch_exports_it_below_opset_20():
    # torch exports Gelu at opset < 20 as x * 0.5 * (1 + erf(x / sqrt(2))).
    x = normal(np.random.default_rng(4), 3, 6, scale=2.0)
    model = _chain([
        _constant("r2", np.sqrt(2.0)), _constant("one", 1.0), _constant("half", 0.5),
        helper.make_node("Div", ["x", "r2"], ["a"]),
        helper.make_node("Erf", ["a"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
        helper.make_node("Mul", ["x", "p"], ["q"]),
        helper.make_node("Mul", ["q", "half"], ["y"]),
    ], x)
    check_gradient(model, {"x": x})


def test_layer_norm_mean_and_inv_std_outputs_carry_their_gradient():
    x = normal(np.random.default_rng(9), 2, 3, 4, scale=2.0)
    scale = normal(np.random.default_rng(10), 4)
    model = _chain([
        _constant("s", scale),
        helper.make_node("LayerNormalization", ["x", "s"], ["n", "m", "r"], axis=-1, epsilon=0.1),
        helper.make_node("Mul", ["m", "r"], ["mr"]),
        helper.make_node("Add", ["n", "mr"], ["y"]),
    ], x)
    check_gradient(model, {"x": x})


def _torch_activations(torch):
    F = torch.nn.functional
    return {
        "celu_alpha_2": ("Celu", {"alpha": 2.0}, 17, lambda t: F.celu(t, 2.0), [0.0]),
        "elu_alpha_0.5": ("Elu", {"alpha": 0.5}, 17, lambda t: F.elu(t, 0.5), [0.0]),
        "selu_default": ("Selu", {}, 17, F.selu, [0.0]),
        "selu_alpha_gamma": ("Selu", {"alpha": 1.5, "gamma": 2.0}, 17,
                             lambda t: 2.0 * torch.where(t > 0, t, 1.5 * (torch.exp(t) - 1)), [0.0]),
        "erf": ("Erf", {}, 17, torch.erf, []),
        "gelu_exact": ("Gelu", {}, 20, F.gelu, []),
        "gelu_tanh": ("Gelu", {"approximate": "tanh"}, 20, lambda t: F.gelu(t, approximate="tanh"), []),
        "hard_sigmoid_alpha_beta": ("HardSigmoid", {"alpha": 0.4, "beta": 0.8}, 17,
                                    lambda t: torch.clamp(0.4 * t + 0.8, 0, 1), [-2.0, 0.5]),
        "hard_sigmoid_torch": ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}, 17, F.hardsigmoid, [-3.0, 3.0]),
        "hard_swish": ("HardSwish", {}, 17, F.hardswish, [-3.0, 3.0]),
        "softplus": ("Softplus", {}, 17, F.softplus, []),
        "softsign": ("Softsign", {}, 17, F.softsign, []),
        "thresholded_relu_alpha_0.5": ("ThresholdedRelu", {"alpha": 0.5}, 17,
                                       lambda t: torch.where(t > 0.5, t, torch.zeros_like(t)), [0.5]),
        "sigmoid": ("Sigmoid", {}, 17, torch.sigmoid, []),
        "tanh": ("Tanh", {}, 17, torch.tanh, []),
    }


TORCH_ACTIVATIONS = ["celu_alpha_2", "elu_alpha_0.5", "selu_default", "selu_alpha_gamma", "erf", "gelu_exact",
                     "gelu_tanh", "hard_sigmoid_alpha_beta", "hard_sigmoid_torch", "hard_swish", "softplus",
                     "softsign", "thresholded_relu_alpha_0.5", "sigmoid", "tanh"]


@pytest.mark.parametrize("case", TORCH_ACTIVATIONS)
def test_activation_gradient_equals_torch_autograd(case):
    # onnxruntime has no float64 kernels for several of these, so finite differences run in
    # float32 with a loose tolerance; torch's float64 autograd pins them down tightly.
    torch = _torch()
    op, attrs, opset, fn, kinks = _torch_activations(torch)[case]
    x = away(normal(np.random.default_rng(21), 3, 4, 5, scale=3.0), kinks)
    seed, got = explain(node_model(op, {"x": x}, attrs, opset=opset), {"x": x})
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (fn(xt) * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(got["x"], xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_instance_norm_gradient_equals_torch_autograd():
    torch = _torch()
    rng = np.random.default_rng(8)
    feeds = {"x": normal(rng, 2, 3, 4, 5, scale=2.0), "scale": normal(rng, 3), "bias": normal(rng, 3)}
    model = static_model("InstanceNormalization", feeds, attrs={"epsilon": 1e-3})
    seed, got = explain(model, feeds, seed_rng=2)
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in feeds.items()}
    y = torch.nn.functional.instance_norm(t["x"], weight=t["scale"], bias=t["bias"], eps=1e-3)
    (y * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    for k in feeds:
        np.testing.assert_allclose(got[k], t[k].grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
