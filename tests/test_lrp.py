"""LRP rules on single layers against numpy, conservation, and Zennit's composites on
PyTorch models exported with both exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zennit_ref as zr
from onnxplain.errors import OptionError
from onnxplain.explainer import Explainer

EPS = 1e-6


# ----------------------------------------------------------------------------- numpy reference
def conv_matrix(w, in_shape, stride=1, pad=0, group=1):
    """The dense matrix of a 2-D convolution (no bias): rows output units, columns input units."""
    c, h, wd = in_shape
    m, cg, kh, kw = w.shape
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    a = np.zeros((m, oh, ow, c, h, wd), dtype=np.float64)
    mg = m // group
    for o in range(m):
        g = o // mg
        for i in range(oh):
            for j in range(ow):
                for ci in range(cg):
                    for u in range(kh):
                        for v in range(kw):
                            y, x = i * stride - pad + u, j * stride - pad + v
                            if 0 <= y < h and 0 <= x < wd:
                                a[o, i, j, g * cg + ci, y, x] = w[o, ci, u, v]
    return a.reshape(m * oh * ow, c * h * wd), (m, oh, ow)


def stab(z, eps=EPS):
    return z + eps * np.where(z < 0, -1.0, 1.0)


def pos(a):
    return np.maximum(a, 0)


def neg(a):
    return np.minimum(a, 0)


def reference(rule, A, b, x, r, low=None, high=None, gamma=0.25, alpha=2.0, beta=1.0, Amod=None):
    """Zennit's rule formulas on a dense layer y = A x + b (x, r: one sample, flat)."""
    xp, xn = pos(x), neg(x)
    if rule == "epsilon":
        return x * (A.T @ (r / stab(A @ x + b)))
    if rule == "zplus":
        s = r / stab(pos(A) @ xp + pos(b) + neg(A) @ xn)
        return xp * (pos(A).T @ s) + xn * (neg(A).T @ s)
    if rule == "alpha_beta":
        sp = r / stab(pos(A) @ xp + pos(b) + neg(A) @ xn)
        sn = r / stab(neg(A) @ xp + neg(b) + pos(A) @ xn)
        return (alpha * (xp * (pos(A).T @ sp) + xn * (neg(A).T @ sp))
                - beta * (xp * (neg(A).T @ sn) + xn * (pos(A).T @ sn)))
    if rule == "gamma":
        up, down = A + gamma * pos(A), A + gamma * neg(A)
        y = A @ x + b
        sp = np.where(y > 0, r, 0) / stab(up @ xp + b + gamma * pos(b) + down @ xn)
        sn = np.where(y < 0, r, 0) / stab(down @ xp + b + gamma * neg(b) + up @ xn)
        return xp * (up.T @ sp + down.T @ sn) + xn * (down.T @ sp + up.T @ sn)
    if rule == "zbox":
        lo, hi = np.full_like(x, low), np.full_like(x, high)
        s = r / stab(A @ x - pos(A) @ lo - neg(A) @ hi)
        return x * (A.T @ s) - lo * (pos(A).T @ s) - hi * (neg(A).T @ s)
    if rule == "wsquare":
        a2 = A ** 2
        return a2.T @ (r / stab(a2 @ np.ones_like(x) + b ** 2))
    if rule == "flat":
        ones = Amod  # the layer with all weights one
        return ones.T @ (r / stab(ones @ np.ones_like(x)))
    raise ValueError(rule)


def single_node_model(op, x_shape, y_shape, consts: dict, **attrs):
    inputs = ["input"] + list(consts)
    node = helper.make_node(op, inputs, ["logits"], name="layer", **attrs)
    g = helper.make_graph([node], "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *x_shape])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *y_shape])],
                          initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _rules_kwargs(rule):
    if rule == "zbox":
        return dict(low=-2.0, high=2.0)
    return {}


RULES = ["epsilon", "zplus", "alpha_beta", "gamma", "zbox", "wsquare", "flat"]


@pytest.fixture(scope="module")
def conv_layer():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 2, 3, 3))  # groups=2 over 4 input channels
    bias = rng.normal(size=4) * 0.3
    model = single_node_model("Conv", (4, 6, 6), (4, 3, 3), {"w": w, "b": bias}, strides=[2, 2], pads=[1, 1, 1, 1],
                              group=2)
    A, _ = conv_matrix(w, (4, 6, 6), stride=2, pad=1, group=2)
    ones, _ = conv_matrix(np.ones_like(w), (4, 6, 6), stride=2, pad=1, group=2)
    return Explainer(model), A, np.repeat(bias, 9), ones


@pytest.mark.parametrize("rule", RULES)
def test_conv_rule_matches_numpy_reference(conv_layer, rule):
    ex, A, b, ones = conv_layer
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    r = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
    ours = ex.attribute(x, method="lrp", target=r, rules={"Conv": rule}, **_rules_kwargs(rule))
    for n in range(2):
        ref = reference(rule, A, b, x[n].ravel().astype(np.float64), r[n].ravel().astype(np.float64),
                        low=-2.0, high=2.0, Amod=ones)
        np.testing.assert_allclose(ours[n].ravel(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("rule", RULES)
def test_gemm_rule_matches_numpy_reference(rule):
    rng = np.random.default_rng(2)
    w, bias = rng.normal(size=(5, 7)), rng.normal(size=5) * 0.3
    ex = Explainer(single_node_model("Gemm", (7,), (5,), {"w": w, "b": bias}, transB=1))
    x = rng.normal(size=(3, 7)).astype(np.float32)
    r = rng.normal(size=(3, 5)).astype(np.float32)
    ours = ex.attribute(x, method="lrp", target=r, rules={"Gemm": rule}, **_rules_kwargs(rule))
    for n in range(3):
        ref = reference(rule, w, bias, x[n].astype(np.float64), r[n].astype(np.float64), low=-2.0, high=2.0,
                        Amod=np.ones_like(w))
        np.testing.assert_allclose(ours[n], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_matmul_with_constant_weight_matches_numpy_reference(rule):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(7, 5))
    ex = Explainer(single_node_model("MatMul", (7,), (5,), {"w": w}))
    x = rng.normal(size=(2, 7)).astype(np.float32)
    r = rng.normal(size=(2, 5)).astype(np.float32)
    ours = ex.attribute(x, method="lrp", target=r, rules={"MatMul": rule})
    for n in range(2):
        ref = reference(rule, w.T, np.zeros(5), x[n].astype(np.float64), r[n].astype(np.float64))
        np.testing.assert_allclose(ours[n], ref, rtol=1e-4, atol=1e-5)


def test_conv_transpose_epsilon_matches_numpy_reference():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 2, 3, 3))  # ConvTranspose: (C_in, C_out, k, k)
    ex = Explainer(single_node_model("ConvTranspose", (3, 3, 3), (2, 5, 5), {"w": w}, strides=[2, 2], pads=[1, 1, 1, 1]))
    # ConvTranspose is the adjoint of the Conv with the same weight from its output space.
    A = conv_matrix(w, (2, 5, 5), stride=2, pad=1)[0].T
    x = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
    r = rng.normal(size=(2, 2, 5, 5)).astype(np.float32)
    for rule in ("epsilon", "zplus"):
        ours = ex.attribute(x, method="lrp", target=r, rules={"ConvTranspose": rule})
        for n in range(2):
            ref = reference(rule, A, np.zeros(A.shape[0]), x[n].ravel().astype(np.float64), r[n].ravel())
            np.testing.assert_allclose(ours[n].ravel(), ref, rtol=1e-4, atol=1e-5)


def test_unfolded_batchnorm_epsilon_is_an_affine_layer():
    rng = np.random.default_rng(5)
    scale, shift = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2, 3)
    ex = Explainer(single_node_model("BatchNormalization", (3, 4, 4), (3, 4, 4),
                                     {"s": scale, "c": shift, "m": mean, "v": var}))
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    r = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    a = (scale / np.sqrt(var + 1e-5)).reshape(1, 3, 1, 1)
    y = a * x + (shift - mean * a.ravel()).reshape(1, 3, 1, 1)
    ours = ex.attribute(x, method="lrp", target=r, rules={"BatchNormalization": "epsilon"})
    np.testing.assert_allclose(ours, x * a * r / stab(y), rtol=1e-4, atol=1e-5)
    # The Zennit composites pass relevance through an unfolded BatchNorm.
    np.testing.assert_allclose(ex.attribute(x, method="lrp.epsilon", target=r), r, rtol=1e-6)


def test_smooth_maxpool_splits_in_proportion_to_activations():
    rng = np.random.default_rng(6)
    ex = Explainer(single_node_model("MaxPool", (2, 4, 4), (2, 2, 2), {}, kernel_shape=[2, 2], strides=[2, 2]))
    x = rng.uniform(0.1, 1, size=(1, 2, 4, 4)).astype(np.float32)
    r = rng.normal(size=(1, 2, 2, 2)).astype(np.float32)
    smooth = ex.attribute(x, method="lrp.epsilon", target=r, maxpool="smooth")
    win = x.reshape(1, 2, 2, 2, 2, 2).sum(axis=(3, 5), keepdims=True)
    ref = x * (r.reshape(1, 2, 2, 1, 2, 1) / win).repeat(2, 3).repeat(2, 5).reshape(1, 2, 4, 4)
    np.testing.assert_allclose(smooth, ref, rtol=1e-5)
    winner = ex.attribute(x, method="lrp.epsilon", target=r)
    np.testing.assert_allclose(winner.reshape(1, 2, 2, 2, 2, 2).sum(axis=(3, 5)), r, rtol=1e-6)
    assert (np.count_nonzero(winner) == r.size)


# ----------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("rule", ["epsilon", "zplus", "alpha_beta", "gamma", "zbox", "wsquare", "flat"])
def test_rules_without_bias_conserve_relevance(conv_layer, rule):
    ex = conv_layer[0]
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    r = rng.uniform(0.1, 1, size=(2, 4, 3, 3)).astype(np.float32)
    ours = ex.attribute(x, method="lrp", target=r, rules={"Conv": rule}, bias=False, **_rules_kwargs(rule))
    np.testing.assert_allclose(ours.sum(axis=(1, 2, 3)), r.sum(axis=(1, 2, 3)), rtol=1e-3)


def test_residual_sum_splits_in_proportion_and_conserves():
    a = helper.make_node("Relu", ["input"], ["a"], name="relu")
    s = helper.make_node("Add", ["input", "a"], ["logits"], name="add")
    g = helper.make_graph([a, s], "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = np.array([[1.0, -2.0, 0.5, 3.0, -0.1, 2.0]], dtype=np.float32)
    r = np.ones((1, 6), dtype=np.float32)
    ours = Explainer(m).attribute(x, method="lrp.epsilon", target=r)
    y = x + np.maximum(x, 0)
    np.testing.assert_allclose(ours, (x + np.maximum(x, 0)) / stab(y), rtol=1e-5)


# ----------------------------------------------------------------------------- Zennit composites
COMPOSITES = ["lrp.epsilon", "lrp.epsilon_plus", "lrp.epsilon_plus_flat", "lrp.epsilon_gamma_box",
              "lrp.epsilon_alpha2_beta1", "lrp.epsilon_alpha2_beta1_flat", "excitation_backprop"]
# Epsilon-LRP with a 1e-6 stabiliser amplifies float32 rounding where z is near zero.
TOLERANCE = {"lrp.epsilon": 5e-3, "lrp.epsilon_alpha2_beta1": 1e-3, "lrp.epsilon_alpha2_beta1_flat": 1e-3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lrp_models")
    cache = {}

    def get(name, exporter):
        if name not in cache:
            cache[name] = {"torch": zr.build(name), "ref": {}}
        entry = cache[name]
        if exporter not in entry:
            entry[exporter] = Explainer(str(zr.export(entry["torch"], folder / f"{name}_{exporter}.onnx", exporter)))
        return entry

    return get


def _inputs(model, n=2):
    rng = np.random.default_rng(11)
    return rng.normal(size=(n,) + type(model).shape).astype(np.float32)


def _kwargs(method):
    return dict(low=-3.0, high=3.0) if method == "lrp.epsilon_gamma_box" else {}


@pytest.mark.parametrize("exporter", zr.EXPORTERS)
@pytest.mark.parametrize("name", list(zr.MODELS))
def test_composites_agree_with_zennit(models, name, exporter):
    entry = models(name, exporter)
    model, ex = entry["torch"], entry[exporter]
    x = _inputs(model)
    logits = ex.predict(x)
    target = logits.argmax(1)
    seed = np.eye(logits.shape[1], dtype=np.float32)[target]
    for method in COMPOSITES:
        if method not in entry["ref"]:
            entry["ref"][method] = zr.zennit_relevance(model, x, seed, method, **_kwargs(method))
        ref = entry["ref"][method]
        ours = ex.attribute(x, method=method, target=target, **_kwargs(method))
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err < TOLERANCE.get(method, 2e-4), f"{method} on {name}/{exporter}: relative error {err:.2e}"


def test_gamma_box_default_bounds_are_each_samples_min_and_max(models):
    entry = models("vgg", "torchscript")
    model, ex = entry["torch"], entry["torchscript"]
    x = _inputs(model)
    target = ex.predict(x).argmax(1)
    ours = ex.attribute(x, method="lrp.epsilon_gamma_box", target=target)
    for n in range(len(x)):
        seed = np.eye(10, dtype=np.float32)[target[n:n + 1]]
        ref = zr.zennit_relevance(model, x[n:n + 1], seed, "lrp.epsilon_gamma_box",
                                  low=float(x[n].min()), high=float(x[n].max()))
        np.testing.assert_allclose(ours[n:n + 1], ref, rtol=1e-3, atol=2e-4 * np.abs(ref).max())


# ----------------------------------------------------------------------------- user composites
def test_user_composite_from_string_dict_and_json_match_the_named_composite(models, tmp_path):
    entry = models("vgg", "torchscript")
    ex, x = entry["torchscript"], _inputs(entry["torch"])
    named = ex.attribute(x, method="lrp.epsilon_gamma_box", target=1, low=-3.0, high=3.0)
    spec = {"conv": "gamma", "dense": "epsilon", "first": "zbox"}
    as_dict = ex.attribute(x, method="lrp", target=1, rules=spec, low=-3.0, high=3.0)
    as_text = ex.attribute(x, method="lrp", target=1, rules="conv:gamma,dense:epsilon,first:zbox", low=-3.0,
                           high=3.0)
    path = tmp_path / "rules.json"
    path.write_text('{"Conv": "gamma", "Gemm": "epsilon", "first": "zbox"}')
    as_file = ex.attribute(x, method="lrp", target=1, rules=str(path), low=-3.0, high=3.0)
    for other in (as_dict, as_text, as_file):
        np.testing.assert_allclose(other, named, rtol=1e-6, atol=1e-9)


def test_user_composite_rule_per_node_name(models):
    entry = models("vgg", "torchscript")
    ex, x = entry["torchscript"], _inputs(entry["torch"])
    first_conv = next(n.name for n in ex.graph.nodes if n.op_type == "Conv")
    per_node = ex.attribute(x, method="lrp", target=2, rules=f"Conv:zplus,node:{first_conv}:flat")
    np.testing.assert_allclose(per_node, ex.attribute(x, method="lrp.epsilon_plus_flat", target=2), rtol=1e-6)


def test_bad_rules_are_one_clear_error(models):
    ex = models("mlp", "torchscript")["torchscript"]
    x = np.zeros((1, 20), dtype=np.float32)
    with pytest.raises(OptionError, match="unknown rule 'gama'"):
        ex.attribute(x, method="lrp", rules="Conv:gama")
    with pytest.raises(OptionError, match="KEY:RULE"):
        ex.attribute(x, method="lrp", rules="gamma")
    with pytest.raises(OptionError, match="alpha - beta"):
        ex.attribute(x, method="lrp", rules="Gemm:alpha_beta", alpha=2.0, beta=2.0)
    with pytest.raises(OptionError, match="does not apply to Relu"):
        ex.attribute(x, method="lrp", rules="Relu:gamma")


def test_exported_lrp_explainer_gives_the_same_relevance(models, tmp_path):
    import onnxruntime as ort

    entry = models("resnet", "torchscript")
    ex, x = entry["torchscript"], _inputs(entry["torch"])
    seed = np.eye(10, dtype=np.float32)[[3, 7]]
    for method in ("lrp.epsilon_plus", "excitation_backprop"):
        spec = ex.export(tmp_path / "e.onnx", method=method)
        sess = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
        out = sess.run([spec.attributions["input"]], {"input": x, spec.seed: seed})[0]
        np.testing.assert_allclose(out, ex.attribute(x, method=method, target=seed), rtol=1e-5, atol=1e-7)
    assert onnx.load(str(tmp_path / "e.onnx")).graph.output


def _relevance_at(model, module, x, seed, method, **kw):
    """Zennit's relevance at `module`'s output: the gradient Zennit's hooks pass through it."""
    kept = []

    def keep(m, i, o):
        o.retain_grad()
        kept.append(o)

    hook = module.register_forward_hook(keep)
    try:
        zr.zennit_relevance(model, x, seed, method, **kw)
    finally:
        hook.remove()
    return kept[-1].grad.detach().numpy()


def _tensor_of(ex, model, module, x):
    import torch

    acts = []
    hook = module.register_forward_hook(lambda m, i, o: acts.append(o.detach().numpy()))
    with torch.no_grad():
        model(torch.tensor(x))
    hook.remove()
    want = acts[0]
    names = [o for n in ex.graph.nodes if n.op_type == "Relu" for o in n.output]
    values = ex._forward(ex._feeds(x), names)
    found = [o for o in names if values[o].shape == want.shape and np.allclose(values[o], want, atol=1e-5)]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("exporter", zr.EXPORTERS)
@pytest.mark.parametrize("method", ["lrp.epsilon_plus", "lrp.epsilon_alpha2_beta1", "excitation_backprop"])
@pytest.mark.parametrize("where", ["features.3", "classifier.2"])
def test_relevance_at_a_layer_agrees_with_zennit(models, exporter, method, where):
    entry = models("vgg", exporter)
    model, ex = entry["torch"], entry[exporter]
    module = model.get_submodule(where)
    x = _inputs(model)
    target = ex.predict(x).argmax(1)
    seed = np.eye(10, dtype=np.float32)[target]
    ref = _relevance_at(model, module, x, seed, method)
    ours = ex.attribute(x, method=method, target=target, layer=_tensor_of(ex, model, module, x))
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < TOLERANCE.get(method, 2e-4), f"{method} at {where}: relative error {err:.2e}"


@pytest.mark.parametrize("method, copies", [("gradient", 0), ("lrp.epsilon", 0), ("lrp", 2)])
def test_explainers_hold_each_modified_weight_once(tmp_path, method, copies):
    """A rule that uses W+ in a forward and in an adjoint, or the model's own weight, must not
    emit copies of it: on VGG-16 each copy of the first dense layer is 411 MB."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 100)).astype(np.float32)
    model = single_node_model("Gemm", (64,), (100,), {"w": w, "b": rng.normal(size=100)})
    options = {"rules": "Gemm:alpha_beta"} if method == "lrp" else {}
    spec = Explainer(model).export(tmp_path / "e.onnx", method=method, **options)
    saved = onnx.load(str(tmp_path / "e.onnx"))
    weight_sized = [t.name for t in saved.graph.initializer if tuple(t.dims) == w.shape]
    assert len(weight_sized) == 1 + copies, weight_sized  # the model's own W, then W+ and W-
    if method == "lrp":  # the deduplicated constants still give the rule's numbers
        x = rng.normal(size=(2, 64)).astype(np.float32)
        r = rng.normal(size=(2, 100)).astype(np.float32)
        bias = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
        got = Explainer(model).attribute(x, method="lrp", rules="Gemm:alpha_beta", target=r)
        for n in range(2):
            ref = reference("alpha_beta", w.T.astype(np.float64), bias, x[n].astype(np.float64), r[n].astype(np.float64))
            np.testing.assert_allclose(got[n], ref, rtol=1e-4, atol=1e-5)


def test_shape_inference_keeps_the_weights_and_infers_every_shape():
    from onnxplain.graph import Graph, infer_types

    rng = np.random.default_rng(2)
    w = rng.normal(size=(300, 200)).astype(np.float32)  # 240 kB: stripped while inferring
    model = single_node_model("Gemm", (300,), (200,), {"w": w, "b": np.zeros(200)})
    before = model.SerializeToString()
    inferred = infer_types(model, strict_mode=False, data_prop=True)
    assert model.SerializeToString() == before
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim][1:] == [200]
    g = Graph(model)
    np.testing.assert_array_equal(g.constant("w"), w)
    assert g.shape("logits")[1:] == (200,)
