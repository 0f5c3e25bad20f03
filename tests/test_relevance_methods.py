"""deep Taylor, (contrastive) excitation backprop and DeepLIFT: their defining properties,
and agreement with Zennit and Captum."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import zennit_ref as zr
from onnxplain.explainer import Explainer
from onnxplain.methods import exportable


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("relevance_models")
    cache = {}

    def get(name, exporter="torchscript"):
        if (name, exporter) not in cache:
            m = zr.build(name)
            cache[(name, exporter)] = (m, Explainer(str(zr.export(m, folder / f"{name}_{exporter}.onnx", exporter))))
        return cache[(name, exporter)]

    return get


def _x(model, n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + type(model).shape).astype(np.float32)


# ----------------------------------------------------------------------------- excitation backprop
@pytest.mark.parametrize("name", ["vgg", "resnet", "densenet"])
def test_excitation_backprop_is_non_negative_and_sums_to_the_seed_mass(exported, name):
    model, ex = exported(name)
    x = _x(model)
    seed = np.zeros((3, 10), dtype=np.float32)
    seed[:, 4] = [1.0, 0.5, 2.0]
    eb = ex.attribute(x, method="excitation_backprop", target=seed)
    if name != "resnet":
        # A residual sum of a signed (BatchNorm) branch and the skip splits in proportion, so
        # a share can be negative: EB assumes non-negative activations, plain CNNs have them.
        assert eb.min() >= -1e-7
    np.testing.assert_allclose(eb.reshape(3, -1).sum(1), seed.sum(1), rtol=1e-4)


def test_excitation_backprop_at_a_layer_sums_to_the_seed_mass(exported):
    model, ex = exported("vgg")
    x = _x(model)
    # The first MaxPool's output: a mid-level tensor.
    layer = [n for n in ex.graph.nodes if n.op_type == "MaxPool"][0].output[0]
    eb = ex.attribute(x, method="excitation_backprop", target=2, layer=layer)
    assert eb.shape[1:] == ex.graph.shape(layer)[1:]
    assert eb.min() >= -1e-7
    np.testing.assert_allclose(eb.reshape(3, -1).sum(1), 1.0, rtol=1e-4)


def test_contrastive_excitation_backprop_is_target_minus_dual(exported, tmp_path):
    model, ex = exported("vgg")
    x = _x(model)
    # The dual: the same model with the explained layer's weights negated.
    dual = onnx.ModelProto()
    dual.CopyFrom(ex.source)
    last = [n for n in dual.graph.node if n.op_type == "Gemm"][-1]
    for init in dual.graph.initializer:
        if init.name == last.input[1]:
            w = -onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    dual_ex = Explainer(dual)
    seed = np.eye(10, dtype=np.float32)[[1, 5, 9]]
    cont = ex.attribute(x, method="contrastive_excitation_backprop", target=seed)
    ref = ex.attribute(x, method="excitation_backprop", target=seed) - \
        dual_ex.attribute(x, method="excitation_backprop", target=seed)
    np.testing.assert_allclose(cont, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(cont.reshape(3, -1).sum(1), 0.0, atol=1e-4)
    layer = [n for n in ex.graph.nodes if n.op_type == "MaxPool"][0].output[0]
    mid = ex.attribute(x, method="contrastive_excitation_backprop", target=seed, layer=layer)
    assert mid.shape[1:] == ex.graph.shape(layer)[1:]


# ----------------------------------------------------------------------------- deep Taylor
def _zennit_deep_taylor(model, x, seed, first):
    from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import ZBox, ZPlus, WSquare
    from zennit.types import Linear

    first_rule = WSquare() if first is None else ZBox(low=torch.full((1,) + x.shape[1:], first[0]),
                                                      high=torch.full((1,) + x.shape[1:], first[1]))
    comp = SpecialFirstLayerMapComposite(layer_map_base() + [(Linear, ZPlus())], [(Linear, first_rule)],
                                         canonizers=[zr.SequentialMergeBatchNorm()])
    zr.set_zennit_mode(model, True)
    try:
        with zr.Gradient(model=model, composite=comp) as attributor:
            _, rel = attributor(torch.tensor(x, requires_grad=True), torch.tensor(seed))
    finally:
        zr.set_zennit_mode(model, False)
    return rel.numpy()


@pytest.mark.parametrize("bounds", [None, (-3.0, 3.0)])
def test_deep_taylor_matches_zplus_with_wsquare_or_zbox_first(exported, bounds):
    model, ex = exported("resnet")
    x = _x(model)
    seed = np.eye(10, dtype=np.float32)[[0, 3, 6]]
    kw = {} if bounds is None else dict(low=bounds[0], high=bounds[1])
    ours = ex.attribute(x, method="deep_taylor", target=seed, **kw)
    ref = _zennit_deep_taylor(model, x, seed, bounds)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 2e-4


def test_deep_taylor_takes_zbox_bounds_from_the_preprocessing(exported):
    model, ex = exported("vgg")
    meta = onnx.ModelProto()
    meta.CopyFrom(ex.source)
    onnx.helper.set_model_props(meta, {"onnxplain.preprocess": '{"scale": 0.00392156862745098, '
                                                               '"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}'})
    x = _x(model)
    with_meta = Explainer(meta).attribute(x, method="deep_taylor", target=1)
    np.testing.assert_allclose(with_meta, ex.attribute(x, method="deep_taylor", target=1, low=-2.0, high=2.0),
                               rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- DeepLIFT
@pytest.mark.parametrize("exporter", zr.EXPORTERS)
@pytest.mark.parametrize("name", ["mlp", "densenet"])
def test_deeplift_agrees_with_captum(exported, name, exporter):
    model, ex = exported(name, exporter)
    x = _x(model)
    target = ex.predict(x).argmax(1)
    for baseline in (0.0, 0.3):
        ours = ex.attribute(x, method="deeplift", target=target, baseline=baseline)
        ref = zr.captum_deeplift(model, x, torch.tensor(target), baseline)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


class _PoolNet(torch.nn.Module):
    """Max pooling with windows that do not overlap (where Captum's MaxUnpool is exact), each
    between Convs: Captum 0.9 loses summation-to-delta where a ReLU directly precedes or
    follows a MaxPool (both hooked modules rewrite the same gradient), so none does here."""

    shape = (3, 12, 12)

    def __init__(self):
        super().__init__()
        nn = torch.nn
        torch.manual_seed(4)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                                 nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.MaxPool2d(3),
                                 nn.Flatten(), nn.Linear(8 * 2 * 2, 10), nn.ReLU(), nn.Linear(10, 4))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("exporter", zr.EXPORTERS)
def test_deeplift_agrees_with_captum_on_a_resnet_with_batchnorm_and_residual_adds(tmp_path, exporter):
    import zoo  # the engine's zoo ResNet has no MaxPool next to a ReLU, which Captum mishandles

    model = zoo.build("resnet").eval()
    ex = Explainer(str(zoo.export(model, tmp_path / "resnet.onnx", exporter)))
    x = _x(model)
    target = ex.predict(x).argmax(1)
    for baseline in (0.0, 0.3):
        ours = ex.attribute(x, method="deeplift", target=target, baseline=baseline)
        ref = zr.captum_deeplift(model, x, torch.tensor(target), baseline)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("exporter", zr.EXPORTERS)
def test_deeplift_maxpool_agrees_with_captum(tmp_path, exporter):
    """The MaxPool rule routes the output differences to the winners of input and baseline,
    as Captum does. The zoo's VGG (overlapping windows, where Captum's unpooling overwrites
    instead of adding, and ReLU before MaxPool) is checked by summation-to-delta below."""
    model = _PoolNet().eval()
    ex = Explainer(str(zr.export(model, tmp_path / "pool.onnx", exporter)))
    x = _x(model, n=4)
    for baseline in (0.0, 0.2):
        ours = ex.attribute(x, method="deeplift", target=2, baseline=baseline)
        ref = zr.captum_deeplift(model, x, 2, baseline)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenet"])
def test_deeplift_sums_to_the_output_difference(exported, name):
    # Summation-to-delta holds for the rescale rule on any of these networks, including
    # overlapping MaxPool windows and ReLU6 (where Captum, which unpools without adding and
    # treats ReLU6 as linear, does not).
    model, ex = exported(name)
    x = _x(model)
    ours = ex.attribute(x, method="deeplift", target=5, baseline=0.1)
    delta = ex.predict(x)[:, 5] - ex.predict(np.full_like(x, 0.1))[:, 5]
    np.testing.assert_allclose(ours.reshape(3, -1).sum(1), delta, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- registry
def test_single_pass_relevance_methods_are_exportable():
    for name in ("lrp.epsilon", "lrp.epsilon_plus", "lrp.epsilon_plus_flat", "lrp.epsilon_gamma_box",
                 "lrp.epsilon_alpha2_beta1", "lrp.epsilon_alpha2_beta1_flat", "deep_taylor",
                 "excitation_backprop", "contrastive_excitation_backprop"):
        assert exportable(name) is not None
