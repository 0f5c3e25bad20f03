"""Agreement with Captum, element-wise, on PyTorch models exported with both exporters.

The same torch model is explained by Captum and, after torch.onnx.export, by onnxplain;
the attributions must agree to float32 precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import (
    Deconvolution, GuidedBackprop, InputXGradient, IntegratedGradients, NoiseTunnel, Saliency,
)

import zoo
from onnxplain import Explainer

CASES = [(name, exp) for name in zoo.ZOO for exp in zoo.EXPORTERS]
IDS = [f"{n}-{e}" for n, e in CASES]
TOL = 2e-5  # max |ours - ref| / max |ref|


def assert_agrees(ours, ref, tol=TOL):
    ref = np.asarray(ref)
    assert ours.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(ours - ref).max()) / scale
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def _input(model, batch=3, seed=1):
    return np.random.default_rng(seed).normal(size=(batch,) + type(model).shape).astype(np.float32)


TARGET = [1, 4, 2]


@pytest.fixture(params=CASES, ids=IDS)
def case(request, exported):
    name, exporter = request.param
    model, path = exported(name, exporter)
    return model, Explainer(path), _input(model)


def test_gradient_equals_captum_saliency(case):
    model, e, x = case
    ref = Saliency(model).attribute(torch.tensor(x), target=TARGET, abs=False)
    assert_agrees(e.attribute(x, method="gradient", target=TARGET), ref.detach().numpy())


def test_input_x_gradient_equals_captum(case):
    model, e, x = case
    ref = InputXGradient(model).attribute(torch.tensor(x), target=TARGET)
    assert_agrees(e.attribute(x, method="input_x_gradient", target=TARGET), ref.detach().numpy())


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                                  "riemann_trapezoid"])
def test_integrated_gradients_equals_captum(case, rule):
    model, e, x = case
    base = np.full_like(x, 0.1)
    ref = IntegratedGradients(model).attribute(torch.tensor(x), baselines=torch.tensor(base), target=TARGET,
                                               n_steps=16, method=rule)
    ours = e.attribute(x, method="integrated_gradients", target=TARGET, n_steps=16, baseline=base,
                       integration=rule)
    assert_agrees(ours, ref.detach().numpy())


def test_guided_backprop_equals_captum(case):
    model, e, x = case
    ref = GuidedBackprop(model).attribute(torch.tensor(x), target=TARGET)
    assert_agrees(e.attribute(x, method="guided_backprop", target=TARGET), ref.detach().numpy())


def test_deconvnet_equals_captum(case):
    model, e, x = case
    ref = Deconvolution(model).attribute(torch.tensor(x), target=TARGET)
    assert_agrees(e.attribute(x, method="deconvnet", target=TARGET), ref.detach().numpy())


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_equals_captum_with_the_same_noise(case, kind, monkeypatch):
    model, e, x = case
    n_samples, stdev = 4, 0.3
    noise = np.random.default_rng(5).normal(0, stdev, size=(n_samples,) + x.shape).astype(np.float32)
    # Captum draws one normal tensor for the batch repeated sample-major (row i*S + s).
    captum_noise = torch.tensor(noise.transpose((1, 0) + tuple(range(2, noise.ndim))).reshape((-1,) + x.shape[1:]))
    monkeypatch.setattr(torch, "normal", lambda mean, std, *a, **k: captum_noise.clone())
    ref = NoiseTunnel(Saliency(model)).attribute(torch.tensor(x), nt_type=kind, nt_samples=n_samples,
                                                 stdevs=stdev, target=TARGET, abs=False)
    ours = e.attribute(x, method=kind, target=TARGET, n_samples=n_samples, stdev=stdev, noise=noise)
    assert_agrees(ours, ref.detach().numpy(), tol=1e-4 if kind == "vargrad" else TOL)


def test_integrated_gradients_is_complete(exported):
    """Completeness: attributions sum to f(x) - f(baseline) for the explained logit."""
    model, path = exported("resnet", "torchscript")
    e = Explainer(path)
    x = _input(model)
    attr = e.attribute(x, method="integrated_gradients", target=TARGET, n_steps=200)
    logits = e.predict(x)
    base = e.predict(np.zeros_like(x))
    want = logits[np.arange(3), TARGET] - base[np.arange(3), TARGET]
    np.testing.assert_allclose(attr.reshape(3, -1).sum(1), want, rtol=2e-2, atol=2e-3)


def test_predicted_class_is_the_default_target(exported):
    model, path = exported("vgg", "dynamo")
    e = Explainer(path)
    x = _input(model)
    pred = e.predict(x).argmax(1)
    np.testing.assert_array_equal(e.attribute(x, method="gradient"), e.attribute(x, method="gradient", target=pred))


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_cli_integrated_gradients_matches_captum(exported, exporter, tmp_path):
    """The issue's acceptance line: `onnxplain explain model.onnx input.npy --method
    integrated_gradients --target 3 --out a.npy` equals Captum on that model."""
    from click.testing import CliRunner

    from onnxplain.cli import main

    model, path = exported("resnet", exporter)
    x = _input(model)
    np.save(tmp_path / "input.npy", x)
    out = tmp_path / "a.npy"
    res = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "input.npy"), "--method",
                                    "integrated_gradients", "--target", "3", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    ref = IntegratedGradients(model).attribute(torch.tensor(x), target=3, n_steps=50)
    assert_agrees(np.load(out), ref.detach().numpy())


@pytest.mark.parametrize("method, hooks", [("guided_backprop", GuidedBackprop), ("deconvnet", Deconvolution)])
def test_clip_as_relu_modifies_relu6_like_captum_would_a_relu(exported, method, hooks):
    """With clip_as_relu, ReLU6 (exported as Clip(0, 6)) gets the modified backward; the
    reference is Captum on the same model with every ReLU6 swapped for a ReLU whose
    forward is still clamped (so the forward pass is unchanged)."""
    model, path = exported("mobilenet", "torchscript")
    x = _input(model)

    class ReLU6AsReLU(torch.nn.ReLU):
        def forward(self, t):
            return torch.clamp(super().forward(t), max=6.0)

    swapped = zoo.build("mobilenet")
    for i, m in enumerate(swapped.net):
        if isinstance(m, torch.nn.ReLU6):
            swapped.net[i] = ReLU6AsReLU()
    ref = hooks(swapped).attribute(torch.tensor(x), target=TARGET)
    ours = Explainer(path).attribute(x, method=method, target=TARGET, clip_as_relu=True)
    assert_agrees(ours, ref.detach().numpy())
    plain = Explainer(path).attribute(x, method=method, target=TARGET)
    assert not np.allclose(plain, ours)
