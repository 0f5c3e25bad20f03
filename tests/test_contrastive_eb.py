"""Contrastive excitation backprop (Zhang et al. 2016; TorchRay's contrastive_excitation_backprop):
the contrast formed below the explained neuron or at a deeper contrast_layer, read at the input
or at a mid-level saliency_layer (summed over channels, its positive part upsampled).

References: a plain torch implementation of the paper's equations (marginal winning
probabilities, the dual unit of negated weights, the contrast subtracted at a layer), and a
hand-built CNN on two-object images where the right answer is known by construction. The
map at the input is also tested against target minus dual (tests/test_relevance_methods.py)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer, OptionError

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny_cnn.onnx"
MID = "/relu2/Relu_output_0"  # (batch, 16, 16, 16) of a (batch, 3, 32, 32) input
METHOD = "contrastive_excitation_backprop"


# ----------------------------------------------------------------------------- a small CNN
# x (N,1,16,16) -> conv1 3x3 -> relu: a1 (N,4,16,16) -> conv2 3x3 stride 2 -> relu: a2 (N,6,8,8)
# -> a3 = a2 + relu(conv3 1x1 (a2)) (a residual block) -> global average pool -> gemm -> logits.
def _cnn(path, w1, b1, w2, b2, w3, b3, wf, bf):
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in
             dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3, wf=wf, bf=bf).items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["z1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["z1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["z2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["z2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["z3"], name="conv3"),
        helper.make_node("Relu", ["z3"], ["branch"], name="relu3"),
        helper.make_node("Add", ["a2", "branch"], ["a3"], name="skip"),
        helper.make_node("GlobalAveragePool", ["a3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["pooled"], name="flatten"),
        helper.make_node("Gemm", ["pooled", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", wf.shape[0]])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------- the paper's equations
def _reference(params, x, target, contrast_at="pooled", non_negative_contrast=False, read_at="x"):
    """Excitation backprop as the paper defines it, in float64 torch, one layer at a time:
    P(a_j) = sum_i a_j w+_ij / (sum_k a_k w+_ik) P(a_i) for every linear map (bias unused, the
    pool a linear map of weights 1/HW), P passed through the ReLUs, split at the residual sum
    in proportion to its summands (TorchRay's eltwise_sum); the dual unit has the negated
    weights of the explained one. The two MWPs are propagated to `contrast_at`, subtracted
    there (their positive part kept if non_negative_contrast) and the difference propagated
    on to `read_at`."""
    w1, b1, w2, b2, w3, b3, wf, bf = (torch.tensor(np.asarray(v), dtype=torch.float64) for v in params)
    x = torch.tensor(x, dtype=torch.float64)
    a1 = F.relu(F.conv2d(x, w1, b1, padding=1))
    a2 = F.relu(F.conv2d(a1, w2, b2, padding=1, stride=2))
    branch = F.relu(F.conv2d(a2, w3, b3))
    a3 = a2 + branch
    pooled = a3.mean(dim=(2, 3))

    def share(z, p):  # p / sum_k a_k w+_ik, a unit with no excitatory input passing nothing on
        return torch.where(z > 0, p / torch.where(z > 0, z, 1.0), 0.0)

    def eb_linear(inp, forward, p):
        inp = inp.detach().requires_grad_(True)
        z = forward(inp)
        (g,) = torch.autograd.grad(z, inp, share(z.detach(), p))
        return inp.detach() * g  # a_j sum_i w+_ij p_i / z_i

    pos = lambda w: w.clamp(min=0)  # noqa: E731
    chain = ["pooled", "a3", "branch", "a2", "a1", "x"]  # every tensor after those it feeds

    def down(p, start, stop):
        """The MWP at `stop` from the MWP `p` at `start`, one tensor of the chain at a time."""
        mwp = {start: p}
        for name in chain[chain.index(start):]:
            if name == stop:
                return mwp[name]
            if name == "pooled":
                mwp["a3"] = eb_linear(a3, lambda t: t.mean(dim=(2, 3)), mwp["pooled"])
            elif name == "a3":  # the residual sum: each summand's share a / (a2 + branch)
                mwp["a2"], mwp["branch"] = a2 * share(a3, mwp["a3"]), branch * share(a3, mwp["a3"])
            elif name == "branch":
                mwp["a2"] = mwp["a2"] + eb_linear(a2, lambda t: F.conv2d(t, pos(w3)), mwp["branch"])
            elif name == "a2":
                mwp["a1"] = eb_linear(a1, lambda t: F.conv2d(t, pos(w2), padding=1, stride=2), mwp["a2"])
            elif name == "a1":
                mwp["x"] = eb_linear(x, lambda t: F.conv2d(t, pos(w1), padding=1), mwp["a1"])
        raise AssertionError(f"{stop} is not below {start}")

    def top(w):  # the explained unit's MWP at the pooled features, one unit of mass
        z = pooled @ pos(w).T
        return pooled * pos(w) * share(z, torch.ones_like(z))

    assert contrast_at in chain and contrast_at != "branch"
    target_p = down(top(wf[target][None]), "pooled", contrast_at)
    dual_p = down(top(-wf[target][None]), "pooled", contrast_at)
    contrast = target_p - dual_p
    if non_negative_contrast:
        contrast = contrast.clamp(min=0)
    return down(contrast, contrast_at, read_at).numpy()


def _params(seed):
    r = np.random.default_rng(seed)
    return (r.normal(size=(4, 1, 3, 3)), r.normal(size=4) * 0.1, r.normal(size=(6, 4, 3, 3)) * 0.5,
            r.normal(size=6) * 0.1, r.normal(size=(6, 6, 1, 1)), r.normal(size=6) * 0.1,
            r.normal(size=(3, 6)), r.normal(size=3) * 0.1)


@pytest.fixture(scope="module")
def random_net(tmp_path_factory):
    params = _params(3)
    path = _cnn(tmp_path_factory.mktemp("ceb") / "cnn.onnx", *params)
    return Explainer(path), params


def _images(n=2, seed=1):
    # Non-negative, as the paper's activations are (an image in [0, 1]).
    return np.random.default_rng(seed).uniform(size=(n, 1, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("contrast_at, non_negative, read_at", [
    ("pooled", False, "x"),  # the default: formed below the classifier, read at the input
    ("pooled", False, "a1"),
    ("a2", False, "x"),  # formed deeper: the same map (the next test), here against the equations
    ("a2", True, "x"),  # TorchRay's non_negative_contrast: only the contrast's positive part goes on
    ("a3", True, "a1"),
    ("a1", True, "a1"),  # formed where it is read
])
def test_the_map_equals_the_papers_equations_element_wise(random_net, contrast_at, non_negative, read_at):
    ex, params = random_net
    x = _images()
    opts = {} if (contrast_at, non_negative) == ("pooled", False) else dict(
        contrast_layer=contrast_at, non_negative_contrast=non_negative)
    for target in (0, 2):
        want = np.concatenate([_reference(params, x[i:i + 1], target, contrast_at, non_negative, read_at)
                               for i in range(len(x))])
        got = ex.attribute(x, method=METHOD, target=target, layer=None if read_at == "x" else read_at, **opts)
        scale = np.abs(want).max()
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_without_truncation_the_contrast_gives_the_same_map_wherever_it_is_formed(random_net):
    # Excitation backprop is linear in the top-down signal (shares of fixed activations), so
    # target minus dual subtracted at any layer that carries all the relevance is one map.
    ex, _ = random_net
    x = _images()
    base = ex.attribute(x, method=METHOD, target=[1, 2])  # a target per row
    for layer in ("pooled", "a3", "a2", "a1"):
        np.testing.assert_allclose(ex.attribute(x, method=METHOD, target=[1, 2], contrast_layer=layer), base,
                                   rtol=1e-4, atol=1e-6 * np.abs(base).max())
    truncated = ex.attribute(x, method=METHOD, target=[1, 2], contrast_layer="a2", non_negative_contrast=True)
    assert np.abs(truncated - base).max() > 1e-3 * np.abs(base).max()


def test_a_saliency_layer_map_is_the_positive_part_of_the_layers_contrast_summed_and_upsampled(random_net):
    # TorchRay: clamp(sum over channels, min=0), then F.interpolate(bilinear, align_corners=False).
    ex, params = random_net
    x = _images()
    got = ex.attribute(x, method=METHOD, target=2, saliency_layer="a2")
    signed = ex.attribute(x, method=METHOD, target=2, saliency_layer="a2", positive=False)
    assert got.shape == signed.shape == (2, 1, 16, 16)
    ref = np.concatenate([_reference(params, x[i:i + 1], 2, read_at="a2") for i in range(2)]).sum(1, keepdims=True)
    for mine, part in ((got, np.maximum(ref, 0)), (signed, ref)):
        want = F.interpolate(torch.tensor(part), size=(16, 16), mode="bilinear", align_corners=False).numpy()
        np.testing.assert_allclose(mine, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert (got >= 0).all() and (signed < 0).any()


# ----------------------------------------------------------------------------- a known answer
def _bars_net(path):
    """A CNN whose right answer is known by construction: class 0 is "a horizontal bar",
    class 1 "a vertical bar". conv1 has a horizontal-bar detector, a vertical-bar detector and
    a blob detector that fires on both; the blob feature votes for both classes, each bar
    feature for its class and against the other."""
    w1 = np.zeros((4, 1, 3, 3))
    w1[0, 0] = [[-1, -1, -1], [2, 2, 2], [-1, -1, -1]]
    w1[1, 0] = np.array(w1[0, 0]).T
    w1[2, 0] = 1.0 / 9  # the blob detector: any ink
    b1 = np.array([-0.5, -0.5, -0.1, -10.0])  # channel 3 never fires
    w2 = np.zeros((6, 4, 3, 3))
    for c in range(3):
        w2[c, c] = 1.0 / 9  # each feature pooled over its neighbourhood
    w2[3:, :3] = np.random.default_rng(0).uniform(0, 0.05, size=(3, 3, 3, 3))  # weak mixed features
    b2 = np.zeros(6)
    w3 = np.eye(6)[:, :, None, None] * 0.5
    b3 = np.zeros(6)
    wf = np.array([[3.0, -1.5, 0.5, 0.1, 0.1, 0.1],
                   [-1.5, 3.0, 0.5, 0.1, 0.1, 0.1]])
    return _cnn(path, w1, b1, w2, b2, w3, b3, wf, np.zeros(2))


def _two_bars():
    """A horizontal bar at the top left and a vertical bar at the bottom right; the region of
    each (with a margin the 3x3 and stride-2 receptive fields reach)."""
    x = np.zeros((1, 1, 16, 16), np.float32)
    x[0, 0, 3, 1:7] = 1.0
    x[0, 0, 9:15, 12] = 1.0
    horizontal = np.zeros((16, 16), bool)
    horizontal[0:7, 0:10] = True
    vertical = np.zeros((16, 16), bool)
    vertical[6:16, 9:16] = True
    return x, horizontal, vertical


@pytest.mark.parametrize("opts", [{}, {"saliency_layer": "a1"},
                                  {"contrast_layer": "a2", "non_negative_contrast": True}])
def test_each_class_map_is_positive_where_that_class_evidence_is(tmp_path, opts):
    ex = Explainer(_bars_net(tmp_path / "bars.onnx"))
    x, horizontal, vertical = _two_bars()
    logits = ex.predict(x)[0]
    assert logits[0] > 0 and logits[1] > 0  # both objects are seen
    maps = [ex.attribute(x, method=METHOD, target=t, **opts)[0].sum(0) for t in (0, 1)]
    for m, own, other in ((maps[0], horizontal, vertical), (maps[1], vertical, horizontal)):
        pos = np.maximum(m, 0)
        # The class's evidence is on its own object (what reaches the other one comes through
        # the blob feature both classes share, which truncation at a layer keeps).
        assert pos[own].sum() > 0.8 * pos.sum()
        if not opts.get("saliency_layer") and not opts.get("non_negative_contrast"):
            neg = np.maximum(-m, 0)
            assert neg[other].sum() > 0.9 * neg.sum()  # and the evidence against it on the other one
    # Two different maps: each peaks on its own object.
    assert horizontal.ravel()[maps[0].argmax()] and vertical.ravel()[maps[1].argmax()]


# ----------------------------------------------------------------------------- the bundled model
@pytest.fixture(scope="module")
def ex():
    return Explainer(TINY)


def _x():
    return np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)


def test_the_default_map_is_read_at_the_input_and_keeps_both_signs(ex):
    x = _x()
    a = ex.attribute(x, method=METHOD, target=[1, 4])
    assert a.shape == x.shape
    assert (a < 0).any() and (a > 0).any()


def test_a_saliency_layer_map_of_a_real_model_is_the_layers_contrast_summed_over_channels_and_upsampled(ex):
    x = _x()
    from PIL import Image

    a = ex.attribute(x, method=METHOD, target=[1, 4], saliency_layer=MID, positive=False)
    assert a.shape == (2, 1, 32, 32)
    at_layer = ex.attribute(x, method=METHOD, target=[1, 4], layer=MID)
    summed = at_layer.sum(axis=1)
    for i in range(2):
        up = np.asarray(Image.fromarray(summed[i].astype(np.float32)).resize((32, 32), Image.BILINEAR))
        np.testing.assert_allclose(a[i, 0], up, rtol=1e-5, atol=1e-7 * np.abs(up).max())
    # Target minus dual, each of the seed's mass 1: the contrast sums to ~0 (up to the mass
    # that units with no excitatory input drop).
    np.testing.assert_allclose(summed.reshape(2, -1).sum(1), 0.0, atol=1e-3)
    # The positive part is taken before upsampling, as TorchRay does.
    positive = ex.attribute(x, method=METHOD, target=[1, 4], saliency_layer=MID)
    for i in range(2):
        up = np.asarray(Image.fromarray(np.maximum(summed[i], 0).astype(np.float32)).resize((32, 32), Image.BILINEAR))
        np.testing.assert_allclose(positive[i, 0], up, rtol=1e-5, atol=1e-7 * np.abs(up).max())


def test_bad_layers_and_options_are_refused_by_name(ex, random_net, tmp_path):
    with pytest.raises(OptionError, match="saliency_layer"):
        ex.attribute(_x(), method=METHOD, target=1, saliency_layer="logits")
    with pytest.raises(OptionError, match="saliency_layer"):
        ex.export(tmp_path / "never.onnx", method=METHOD, saliency_layer=MID)
    with pytest.raises(OptionError, match="non_negative_contrast"):
        ex.export(tmp_path / "never.onnx", method=METHOD, contrast_layer=MID, non_negative_contrast=True)
    net, _ = random_net
    x = _images()
    with pytest.raises(OptionError, match="give contrast_layer"):
        net.attribute(x, method=METHOD, target=0, non_negative_contrast=True)
    with pytest.raises(OptionError, match="not a tensor"):
        net.attribute(x, method=METHOD, target=0, contrast_layer="nowhere")
    with pytest.raises(OptionError, match="below the explained layer"):
        net.attribute(x, method=METHOD, target=0, contrast_layer="logits")
    with pytest.raises(OptionError, match="does not depend on a2"):
        net.attribute(x, method=METHOD, target=0, contrast_layer="a1", layer="a2")
    # Inside the residual branch: the skip path's share would be lost, not silently dropped.
    with pytest.raises(OptionError, match="every path"):
        net.attribute(x, method=METHOD, target=0, contrast_layer="branch")


def test_the_clis_picture_on_the_bundled_photo_follows_the_class(tmp_path):
    """`onnxplain explain -m contrastive_excitation_backprop` on the bundled photo draws the
    paper's map (mid layer, positive part): for the cat (tiger cat) and another class (lynx)
    two different maps, where today's signed map at the input was one top/bottom split."""
    from click.testing import CliRunner

    from onnxplain import cli

    maps = {}
    for target in (282, 287):
        r = CliRunner().invoke(cli.main, ["explain", "-m", METHOD, "-t", str(target), "-o",
                                          str(tmp_path / f"{target}.npy")])
        assert r.exit_code == 0, r.output
        assert "saliency_layer=/_blocks.10/Add_output_0" in r.stderr
        maps[target] = np.load(tmp_path / f"{target}.npy")[0, 0]
        assert maps[target].shape == (224, 224) and maps[target].min() == 0 and maps[target].max() > 0
    assert np.corrcoef(maps[282].ravel(), maps[287].ravel())[0, 1] < 0.5
