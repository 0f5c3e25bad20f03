"""Class activation maps agree with pytorch-grad-cam and Captum on PyTorch models exported
to ONNX with both exporters.

pytorch-grad-cam (package `grad-cam`, with `ttach` and `opencv-python-headless`, installed
--no-deps) imports torchvision at module level for helpers the CAMs do not use; a stub of
those modules stands in while it is imported and is removed afterwards, as zennit_ref does.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam

import zoo
from onnxplain import Explainer
from onnxplain.errors import OptionError
from onnxplain.methods.cam import default_layer


def _import_grad_cam():
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops")
    if "torchvision" in sys.modules:
        return __import__("pytorch_grad_cam")
    tv, tr, fn, ops = (types.ModuleType(n) for n in names)
    tr.Compose = tr.Normalize = tr.ToTensor = fn.resize = None
    tv.transforms, tr.functional, tv.ops = tr, fn, ops
    sys.modules.update(dict(zip(names, (tv, tr, fn, ops))))
    try:
        import pytorch_grad_cam
    except ImportError:
        pytorch_grad_cam = None
    finally:
        for n in names:
            sys.modules.pop(n, None)
    return pytorch_grad_cam


gc = _import_grad_cam()
needs_grad_cam = pytest.mark.skipif(gc is None, reason="pytorch-grad-cam (grad-cam, ttach, opencv) not installed")

# model name -> the module whose output is the tensor before global average pooling
LAYERS = {"resnet": lambda m: m.layer2, "mobilenet": lambda m: m.net}
CASES = [(n, e) for n in LAYERS for e in zoo.EXPORTERS]
IDS = [f"{n}-{e}" for n, e in CASES]
TARGET = [1, 4, 2]
TOL = 2e-5


def assert_agrees(ours, ref, tol=TOL):
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max()) / max(float(np.abs(ref).max()), 1e-12)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.fixture(params=CASES, ids=IDS)
def case(request, exported):
    name, exporter = request.param
    model, path = exported(name, exporter)
    x = np.random.default_rng(3).normal(size=(3,) + type(model).shape).astype(np.float32)
    return model, LAYERS[name](model), Explainer(path), x


def test_default_layer_is_the_tensor_before_global_pooling(case):
    model, layer, e, x = case
    acts = []
    hook = layer.register_forward_hook(lambda m, i, o: acts.append(o.detach().numpy()))
    model(torch.tensor(x))
    hook.remove()
    name = default_layer(e._graph_for(e._feeds(x)), e.explained_tensor())
    np.testing.assert_allclose(e._forward(e._feeds(x), [name])[name], acts[0], rtol=1e-5, atol=1e-5)


@needs_grad_cam
@pytest.mark.parametrize("method,reference", [
    ("grad_cam", "GradCAM"), ("grad_cam_pp", "GradCAMPlusPlus"), ("xgrad_cam", "XGradCAM"),
    ("layer_cam", "LayerCAM"), ("score_cam", "ScoreCAM"),
])
def test_cams_equal_pytorch_grad_cam(case, method, reference):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, layer, e, x = case
    with getattr(gc, reference)(model=model, target_layers=[layer]) as cam:
        ref = cam(input_tensor=torch.tensor(x, requires_grad=True),
                  targets=[ClassifierOutputTarget(t) for t in TARGET])
    ours = e.attribute(x, method=method, target=TARGET, normalize=True)
    assert ours.shape == (3, 1) + x.shape[2:]
    assert_agrees(ours[:, 0], ref, tol=1e-4)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("relu", [True, False])
def test_grad_cam_equals_captum_layer_grad_cam_interpolated(case, interpolation, relu):
    model, layer, e, x = case
    raw = LayerGradCam(model, layer).attribute(torch.tensor(x), target=TARGET, relu_attributions=relu)
    ref = LayerAttribution.interpolate(raw, tuple(x.shape[2:]), interpolate_mode=interpolation)
    ours = e.attribute(x, method="grad_cam", target=TARGET, relu=relu, interpolation=interpolation)
    assert_agrees(ours, ref.detach().numpy())
    at_layer = e.attribute(x, method="grad_cam", target=TARGET, relu=relu, upsample=False)
    assert_agrees(at_layer, raw.detach().numpy())


def test_guided_grad_cam_equals_captum(case):
    model, layer, e, x = case
    ref = GuidedGradCam(model, layer).attribute(torch.tensor(x), target=TARGET)
    ours = e.attribute(x, method="guided_grad_cam", target=TARGET, interpolation="nearest")
    assert_agrees(ours, ref.detach().numpy(), tol=1e-4)


def test_cam_is_grad_cam_times_the_pooled_area(case):
    """With GAP -> linear, Grad-CAM's weights are the class weights over h*w (Zhou = Selvaraju)."""
    model, layer, e, x = case
    cam = e.attribute(x, method="cam", target=TARGET, upsample=False)
    grad = e.attribute(x, method="grad_cam", target=TARGET, upsample=False)
    assert_agrees(cam / np.prod(cam.shape[2:]), grad)


def test_layer_is_any_tensor_and_cam_needs_the_pooled_one(exported):
    model, path = exported("resnet", "torchscript")
    e = Explainer(path)
    x = np.random.default_rng(0).normal(size=(2,) + type(model).shape).astype(np.float32)
    stem = e.graph.nodes[2].output[0]  # an early 16x16 tensor
    ref = LayerGradCam(model, model.layer1).attribute(torch.tensor(x), target=1, relu_attributions=True)
    layer1 = next(o for n in e.graph.nodes for o in n.output
                  if e.graph.shape(o) == ("batch", 8, 16, 16) and n.op_type == "Relu" and o != stem and
                  np.allclose(e._forward(e._feeds(x), [o])[o], _activation(model, model.layer1, x), atol=1e-5))
    assert_agrees(e.attribute(x, method="grad_cam", target=1, layer=layer1), ref.detach().numpy())
    with pytest.raises(OptionError, match="grad_cam"):
        e.attribute(x, method="cam", target=1, layer=layer1)


def test_cam_without_a_linear_head_suggests_grad_cam(exported):
    model, path = exported("vgg", "torchscript")  # flatten -> MLP, no global pooling
    e = Explainer(path)
    x = np.random.default_rng(0).normal(size=(1,) + type(model).shape).astype(np.float32)
    with pytest.raises(OptionError, match="grad_cam"):
        e.attribute(x, method="cam", target=0)
    assert e.attribute(x, method="grad_cam", target=0).shape == (1, 1, 16, 16)


def test_cam_on_the_bundled_model_runs_from_the_cli(tmp_path):
    from click.testing import CliRunner

    from onnxplain.cli import main

    out = tmp_path / "cam.png"
    res = CliRunner().invoke(main, ["explain", "models/tiny_cnn.onnx", _npy(tmp_path), "-m", "grad_cam",
                                    "-O", "normalize=true", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert out.is_file()


def _npy(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32))
    return str(p)


def _activation(model, module, x):
    acts = []
    hook = module.register_forward_hook(lambda m, i, o: acts.append(o.detach().numpy()))
    model(torch.tensor(x))
    hook.remove()
    return acts[0]
