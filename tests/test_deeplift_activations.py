"""DeepLIFT's rescale rule on every element-wise activation, decomposed ones included.

Exporters write SiLU as Sigmoid and Mul, GELU as Div/Erf/Add/Mul/Mul (or Pow/Tanh), Mish as
Softplus/Tanh/Mul: a product of two tensors computed from the same x. The rescale multiplier
(f(x) - f(x0)) / (x - x0) holds for the whole activation, not for its factors, so
`onnxplain.groups` finds these subgraphs and the compiler gives each one rule. Checked here:
the groups and their kinds for both torch.onnx.export paths, summation-to-delta (the
attributions sum to f(x) - f(x0) at the explained output) through every activation the
gradient rules support, and agreement with Captum's DeepLift where Captum's rescale rule
covers the activation as one module.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gradcheck import check_gradient, node_model
from onnxplain import groups
from onnxplain.explainer import Explainer

nn = torch.nn
EXPORTERS = ("torchscript", "dynamo")

ACTIVATIONS = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "prelu": lambda: nn.PReLU(8, 0.2), "elu": nn.ELU,
    "selu": nn.SELU, "celu": lambda: nn.CELU(0.7), "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softplus": nn.Softplus,
    "softsign": nn.Softsign, "hardsigmoid": nn.Hardsigmoid, "hardswish": nn.Hardswish, "relu6": nn.ReLU6,
    "hardtanh": nn.Hardtanh, "silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "mish": nn.Mish,
}
# What each exporter writes for the activations it decomposes: the group kind onnxplain must
# recognise (torch.onnx.export dynamo=True has Gelu and Mish operators at opset 18+).
DECOMPOSED = {
    "torchscript": {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "mish": "mish",
                    "softsign": "softsign"},
    "dynamo": {"silu": "silu", "softsign": "softsign", "softplus": "softplus"},
}


class _Net(nn.Module):
    """Linear, activation, linear, activation, linear: two activations in a row, each its
    own module instance (Captum's hooks need that)."""

    shape = (6,)

    def __init__(self, make):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(6, 8), make(), nn.Linear(8, 8), make(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def _export(model, path, exporter):
    x = torch.randn(2, *type(model).shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("activations")
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            model = _Net(ACTIVATIONS[name]).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            cache[(name, exporter)] = model, Explainer(str(_export(model, folder / f"{name}_{exporter}.onnx",
                                                                    exporter)))
        return cache[(name, exporter)]

    return get


def _inputs(n=5, seed=0):
    # Scaled so that every activation sees both of its regimes (and HardSwish/ReLU6 their
    # flat parts), with one sample equal to a baseline to cover x == x0.
    x = 2.5 * np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)
    x[-1] = 0.3
    return x


BASELINES = (0.0, 0.3, "sample")


def _baseline(b):
    if isinstance(b, str):
        return np.random.default_rng(7).normal(size=(1, 6)).astype(np.float32)
    return b


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "mish", "hardswish", "softsign", "softplus"])
def test_decomposed_activations_are_found_as_one_group_of_their_kind(nets, name, exporter):
    _, ex = nets(name, exporter)
    found = sorted(g.kind for g in groups.find(ex.graph).values())
    want = DECOMPOSED[exporter].get(name)
    assert found == ([want, want] if want else []), [(n.op_type, list(n.input)) for n in ex.graph.nodes]
    for g in groups.find(ex.graph).values():
        # Nothing inside a group is read outside it: one tensor in, one tensor out.
        inside = {n.name for n in g.nodes}
        for t in g.inner_tensors():
            assert all(c.name in inside for c in ex.graph.consumers.get(t, []))


def _chain_model(body, consts=()):
    """x (N, 4) -> body nodes -> y, with scalar constants `consts` (name, value)."""
    inits = [numpy_helper.from_array(np.array(v, dtype=np.float32), k) for k, v in consts]
    g = helper.make_graph(body, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


M = helper.make_node
ORDERINGS = {
    "silu_sigmoid_first": ([M("Sigmoid", ["x"], ["s"]), M("Mul", ["s", "x"], ["y"])], [], "silu"),
    "gelu_half_first": ([M("Mul", ["x", "half"], ["h"]), M("Mul", ["x", "rs2"], ["u"]), M("Erf", ["u"], ["e"]),
                         M("Add", ["one", "e"], ["a"]), M("Mul", ["a", "h"], ["y"])],
                        [("half", 0.5), ("rs2", 1 / math.sqrt(2)), ("one", 1.0)], "gelu"),
    "gelu_half_last": ([M("Div", ["x", "s2"], ["u"]), M("Erf", ["u"], ["e"]), M("Add", ["e", "one"], ["a"]),
                        M("Mul", ["a", "x"], ["p"]), M("Mul", ["half", "p"], ["y"])],
                       [("half", 0.5), ("s2", math.sqrt(2)), ("one", 1.0)], "gelu"),
    "gelu_tanh_pow": ([M("Pow", ["x", "three"], ["c"]), M("Mul", ["c", "k"], ["ck"]), M("Add", ["x", "ck"], ["i"]),
                       M("Mul", ["i", "r"], ["u"]), M("Tanh", ["u"], ["t"]), M("Add", ["t", "one"], ["a"]),
                       M("Mul", ["x", "half"], ["h"]), M("Mul", ["h", "a"], ["y"])],
                      [("three", 3.0), ("k", 0.044715), ("r", math.sqrt(2 / math.pi)), ("one", 1.0), ("half", 0.5)],
                      "gelu_tanh"),
    "hardswish_clip": ([M("Add", ["x", "three"], ["a"]), M("Clip", ["a", "zero", "six"], ["c"]),
                        M("Mul", ["x", "c"], ["p"]), M("Div", ["p", "six"], ["y"])],
                       [("three", 3.0), ("zero", 0.0), ("six", 6.0)], "hardswish"),
    "swish_beta": ([M("Mul", ["x", "beta"], ["bx"]), M("Sigmoid", ["bx"], ["s"]), M("Mul", ["x", "s"], ["y"])],
                   [("beta", 1.7)], "swish"),
    "square": ([M("Mul", ["x", "x"], ["y"])], [], "square"),
}


@pytest.mark.parametrize("case", sorted(ORDERINGS))
def test_group_kind_does_not_depend_on_operand_order(case):
    body, consts, kind = ORDERINGS[case]
    ex = Explainer(_chain_model(body, consts), canonize=False)
    found = groups.find(ex.graph)
    assert [(g.kind, g.input, g.output, len(g.nodes)) for g in found.values()] == [(kind, "x", "y", len(body))]


def test_a_residual_sum_ends_a_group_and_a_factor_read_elsewhere_widens_it():
    # y = x + silu(x): the residual Add is a linear combination (its own rule keeps exact
    # multipliers), so the group stops at the SiLU. Where the sigmoid is also read outside
    # the product, the group is the whole element-wise function of x those readers form.
    body = [M("Sigmoid", ["x"], ["s"]), M("Mul", ["x", "s"], ["silu"]), M("Add", ["x", "silu"], ["y"])]
    found = groups.find(Explainer(_chain_model(body), canonize=False).graph)
    assert [(g.kind, g.output) for g in found.values()] == [("silu", "silu")]
    escaping = [M("Sigmoid", ["x"], ["s"]), M("Mul", ["x", "s"], ["p"]), M("Relu", ["s"], ["r"]),
                M("Add", ["p", "r"], ["y"])]
    found = groups.find(Explainer(_chain_model(escaping), canonize=False).graph)
    assert [g.output for g in found.values()] == ["y"]  # the whole element-wise function of x


# ----------------------------------------------------------------------------- summation-to-delta
# Activations both exporters write as the same single operator run with one of them.
EXPORTED_DIFFERENTLY = ("silu", "gelu", "gelu_tanh", "mish", "softsign", "softplus", "relu6", "hardtanh")
CASES = [(n, "torchscript") for n in sorted(ACTIVATIONS)] + [(n, "dynamo") for n in EXPORTED_DIFFERENTLY]


@pytest.mark.parametrize("name,exporter", CASES)
def test_deeplift_sums_to_the_output_difference_through_each_activation(nets, name, exporter):
    model, ex = nets(name, exporter)
    x = _inputs()
    target = 1
    for b in BASELINES:
        base = _baseline(b)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every activation has its rescale rule: nothing to warn about
            ours = ex.attribute(x, method="deeplift", target=target, baseline=base)
        delta = ex.predict(x)[:, target] - ex.predict(np.broadcast_to(base, x.shape).astype(np.float32))[:, target]
        np.testing.assert_allclose(ours.sum(1), delta, rtol=2e-5, atol=2e-5 * np.abs(delta).max(),
                                   err_msg=f"baseline {b}")
        assert np.all(ours[-1] == 0) if b == 0.3 else True  # nothing moved, nothing attributed


def _single_op_net(op, attrs=None, opset=17, consts=()):
    """Gemm -> op -> Gemm, for operators no torch module exports on its own."""
    rng = np.random.default_rng(11)
    w1, w2 = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    inits += [numpy_helper.from_array(np.array(v, dtype=np.float32), k) for k, v in consts]
    extra = [k for k, _ in consts]
    nodes = [M("MatMul", ["x", "w1"], ["h"]), M(op, ["h"] + extra, ["a"], **(attrs or {})),
             M("MatMul", ["a", "w2"], ["y"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


SINGLE_OPS = {
    "erf": ("Erf", {}, 17, ()), "exp": ("Exp", {}, 17, ()), "abs": ("Abs", {}, 17, ()), "sin": ("Sin", {}, 17, ()),
    "cos": ("Cos", {}, 17, ()), "cube": ("Pow", {}, 17, (("p", 3.0),)), "thresholded_relu":
        ("ThresholdedRelu", {"alpha": 0.5}, 17, ()), "mish_op": ("Mish", {}, 18, ()),
    "gelu_op": ("Gelu", {}, 20, ()), "gelu_tanh_op": ("Gelu", {"approximate": "tanh"}, 20, ()),
    "hardswish_op": ("HardSwish", {}, 17, ()), "max_with_constant": ("Max", {}, 17, (("c", 0.25),)),
    "atan": ("Atan", {}, 17, ()), "sinh": ("Sinh", {}, 17, ()),
    "shrink": ("Shrink", {"lambd": 0.5, "bias": 0.2}, 17, ()),
}


@pytest.mark.parametrize("case", sorted(SINGLE_OPS))
def test_deeplift_sums_to_the_output_difference_through_each_single_operator(case):
    op, attrs, opset, consts = SINGLE_OPS[case]
    ex = Explainer(_single_op_net(op, attrs, opset, consts))
    x = 1.5 * np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
    for b in (0.0, 0.4):
        ours = ex.attribute(x, method="deeplift", target=0, baseline=b)
        delta = ex.predict(x)[:, 0] - ex.predict(np.full_like(x, b))[:, 0]
        np.testing.assert_allclose(ours.sum(1), delta, rtol=2e-5, atol=2e-5 * np.abs(delta).max())


def test_deeplift_sums_to_the_output_difference_on_the_reported_silu_and_gelu_network(tmp_path):
    """The first-hour report: SiLU and GELU between Linear layers, attributions summing to
    14.25 where the output moved by 10.87 (the product rule at x * sigmoid(x))."""

    class Net(nn.Module):
        shape = (10,)

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.c = nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x):
            return self.c(nn.functional.gelu(self.b(nn.functional.silu(self.a(x)))))

    model = Net().eval()
    for exporter in EXPORTERS:
        ex = Explainer(str(_export(model, tmp_path / f"net_{exporter}.onnx", exporter)))
        x = 3 * np.random.default_rng(5).normal(size=(3, 10)).astype(np.float32)
        ours = ex.attribute(x, method="deeplift", target=2, baseline=0.0)
        delta = ex.predict(x)[:, 2] - ex.predict(np.zeros_like(x))[:, 2]
        np.testing.assert_allclose(ours.sum(1), delta, rtol=1e-5, atol=1e-5 * np.abs(delta).max())


# ----------------------------------------------------------------------------- Captum
# Captum's DeepLift applies its rescale rule (`nonlinear`) to the modules it lists and the
# plain gradient to any other: for SiLU, GELU, Mish, Hardswish, ... it silently loses
# summation-to-delta. Listing them with Captum's own rule gives the rescale rule on the
# activation as one module: the reference in theory.
RESCALED_IN_CAPTUM = ("relu", "leaky_relu", "elu", "sigmoid", "tanh", "softplus")
EXTENDED = {"selu": nn.SELU, "celu": nn.CELU, "softsign": nn.Softsign, "hardsigmoid": nn.Hardsigmoid,
            "hardswish": nn.Hardswish, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh, "silu": nn.SiLU,
            "gelu": nn.GELU, "gelu_tanh": nn.GELU, "mish": nn.Mish}


@pytest.mark.parametrize("name,exporter", [c for c in CASES if c[0] in RESCALED_IN_CAPTUM + tuple(EXTENDED)])
def test_deeplift_agrees_with_captum_rescale_on_the_whole_activation(nets, name, exporter, monkeypatch):
    from captum.attr import DeepLift
    from captum.attr._core import deep_lift

    if name in EXTENDED:
        monkeypatch.setitem(deep_lift.SUPPORTED_NON_LINEAR, EXTENDED[name], deep_lift.nonlinear)
    model, ex = nets(name, exporter)
    x = _inputs(seed=1)[:-1]
    for b in (-0.7, "sample"):
        base = _baseline(b)
        ours = ex.attribute(x, method="deeplift", target=2, baseline=base)
        xt = torch.tensor(x, requires_grad=True)
        bt = torch.tensor(np.broadcast_to(base, x.shape).astype(np.float32))
        ref = DeepLift(model).attribute(xt, baselines=bt, target=2).detach().numpy()
        # float32 rounding of (y - y0) / (x - x0) where x0 is near x: a few 1e-5 of the largest value
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=f"baseline {b}")


# ----------------------------------------------------------------------------- gradients
def test_mish_gradient_matches_finite_differences_and_torch():
    # dynamo exports nn.Mish as the Mish operator (opset 18), whose rule DeepLIFT's needs.
    x = np.random.default_rng(4).normal(size=(3, 7)).astype(np.float32) * 3
    model = node_model("Mish", {"x": x}, opset=18)
    check_gradient(model, {"x": x})
    ours = Explainer(model, canonize=False).attribute(x, method="gradient", target=np.ones_like(x), probability=True)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    nn.functional.mish(xt).sum().backward()
    np.testing.assert_allclose(ours, xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_a_layer_inside_a_group_keeps_the_group_as_nodes(nets):
    # Attributing at the sigmoid inside a SiLU: the group cannot be skipped over.
    model, ex = nets("silu", "torchscript")
    sig = [n for n in ex.graph.nodes if n.op_type == "Sigmoid"][0].output[0]
    x = _inputs()
    a = ex.attribute(x, method="deeplift", target=1, layer=sig, baseline=0.0)
    assert a.shape == (5, 8) and np.abs(a).max() > 0
    g = ex.attribute(x, method="gradient", target=1, layer=sig)
    assert np.abs(g).max() > 0


# ----------------------------------------------------------------------------- normalisations
class _NormNet(nn.Module):
    shape = (4,)

    def __init__(self, norm):
        super().__init__()
        torch.manual_seed(6)
        self.a, self.norm, self.b = nn.Linear(4, 8), norm, nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


class _HandRMSNorm(nn.Module):
    """RMSNorm as model code writes it (LLaMA): x * rsqrt(mean(x^2) + eps) * weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


@pytest.mark.parametrize("case", ["layernorm_opset14", "rmsnorm_dynamo", "rmsnorm_by_hand_torchscript",
                                  "rmsnorm_by_hand_dynamo"])
def test_decomposed_normalisations_are_groups_that_deeplift_leaves_to_the_gradient_with_a_warning(tmp_path, case):
    norm = nn.LayerNorm(8) if case.startswith("layernorm") else nn.RMSNorm(8, eps=1e-6) \
        if case == "rmsnorm_dynamo" else _HandRMSNorm()
    model = _NormNet(norm).eval()
    x = torch.randn(2, 4)
    path = tmp_path / "norm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.endswith("dynamo"):
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=14 if "14" in case else 17,
                              dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
    ex = Explainer(str(path))
    found = list(groups.find(ex.graph).values())
    kind = "layernorm" if case.startswith("layernorm") else "rmsnorm"
    assert [(g.kind, g.elementwise) for g in found] == [(kind, False)], [n.op_type for n in ex.graph.nodes]
    xs = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    with pytest.warns(UserWarning, match=f"deeplift has no rescale rule for {kind}"):
        ours = ex.attribute(xs, method="deeplift", target=1, baseline=0.2)
    # The gradient through the normalisation, as Captum's DeepLift takes it for these modules.
    from captum.attr import DeepLift

    ref = DeepLift(model).attribute(torch.tensor(xs, requires_grad=True), baselines=torch.full((3, 4), 0.2),
                                    target=1).detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_a_group_starts_where_its_paths_fork_not_at_the_bias_or_position_added_before(tmp_path):
    # Linear on a 3-D input exports as MatMul + Add(bias); a position embedding is an Add
    # before the LayerNorm: both belong to the layer before, so the kinds are named.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(8)
            self.pos = nn.Parameter(torch.randn(5, 8))
            self.ln, self.lin, self.act = nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()

        def forward(self, x):
            return self.act(self.lin(self.ln(x + self.pos))).sum(1)

    path = tmp_path / "block.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Block().eval(), (torch.randn(2, 5, 8),), str(path), dynamo=False, opset_version=14,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    ex = Explainer(str(path))
    found = sorted((g.kind, ex.graph.producer[g.input].op_type) for g in groups.find(ex.graph).values())
    assert found == [("gelu", "Add"), ("layernorm", "Add")]
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"no rescale rule for layernorm \(decomposed"):
        ex.attribute(x, method="deeplift", target=3, baseline=0.1)


def test_a_group_with_a_piecewise_constant_member_sums_to_the_difference():
    # y = x * floor(x) + x * x: two groups meeting at a sum (exact as it is); Floor passes no
    # gradient, and each element's attribution is the seed times its own output difference.
    body = [M("Floor", ["x"], ["f"]), M("Mul", ["x", "f"], ["a"]), M("Mul", ["x", "x"], ["b"]),
            M("Add", ["a", "b"], ["y"])]
    ex = Explainer(_chain_model(body), canonize=False)
    assert sorted((g.kind, len(g.nodes)) for g in groups.find(ex.graph).values()) == [("elementwise", 2),
                                                                                      ("square", 1)]
    x = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32) * 2
    seed = np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32)
    ours = ex.attribute(x, method="deeplift", target=seed, baseline=0.25, probability=True)
    ref = ex.predict(x) - ex.predict(np.full_like(x, 0.25))
    np.testing.assert_allclose(ours, seed * ref, rtol=1e-5, atol=1e-6)
