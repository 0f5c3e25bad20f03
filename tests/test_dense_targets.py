"""Region, mask and frame targets on models written in the tests (a small U-Net, a CTC-style
recogniser with a batch-first and a sequence-first output), each gradient checked against
torch autograd of the same sum; and the pictures `explain` draws for dense targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from detection_models import TinyCTC, TinyUNet
from onnxplain import cli
from onnxplain.explainer import Explainer

RNG = np.random.default_rng(0)


def _export(net, x, path, dynamic):
    torch.onnx.export(net, (torch.from_numpy(x),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    torch.manual_seed(0)
    net = TinyUNet().eval()
    x = RNG.uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    path = _export(net, x, tmp_path_factory.mktemp("unet") / "unet.onnx", {"x": {0: "n"}, "y": {0: "n"}})
    return net, x, path


def _autograd(net, x, score):
    xt = torch.from_numpy(x).requires_grad_(True)
    score(net(xt)).backward()
    return xt.grad.numpy()


def test_a_region_target_is_the_gradient_of_the_class_logits_summed_over_the_rectangle(unet):
    net, x, path = unet
    got = Explainer(str(path)).attribute(x, target="region:3,5,11,9:2")
    want = _autograd(net, x, lambda y: y[:, 2, 5:9, 3:11].sum())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_mask_target_sums_the_class_over_the_masks_pixels(unet, tmp_path):
    net, x, path = unet
    mask = np.zeros((16, 16), bool)
    mask[2:6, 1:4] = mask[10:14, 8:15] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    got = Explainer(str(path)).attribute(x, method="gradient", target=f"mask:{tmp_path / 'm.png'}:1")
    want = _autograd(net, x, lambda y: y[:, 1][:, torch.from_numpy(mask)].sum())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module", params=[False, True], ids=["batch-first", "sequence-first"])
def ctc(request, tmp_path_factory):
    torch.manual_seed(1)
    net = TinyCTC(sequence_first=request.param).eval()
    x = RNG.normal(size=(3, 8, 12)).astype(np.float32)
    out_axis = 1 if request.param else 0
    path = _export(net, x, tmp_path_factory.mktemp("ctc") / "ctc.onnx", {"x": {0: "n"}, "y": {out_axis: "n"}})
    return net, x, path, request.param


def _frames(y, sequence_first):
    return y.transpose(0, 1) if sequence_first else y  # (N, T, C)


def test_a_step_target_explains_one_frames_class_in_either_layout(ctc):
    net, x, path, seq_first = ctc
    got = Explainer(str(path)).attribute(x, target="step:7:3")
    want = _autograd(net, x, lambda y: _frames(y, seq_first)[:, 7, 3].sum())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_steps_target_without_class_explains_each_frames_predicted_class(ctc):
    net, x, path, seq_first = ctc
    with torch.no_grad():
        winners = _frames(net(torch.from_numpy(x)), seq_first)[:, 2:6].argmax(-1)
    got = Explainer(str(path)).attribute(x, target="steps:2-5")
    want = _autograd(net, x, lambda y: _frames(y, seq_first)[:, 2:6].gather(2, winners[..., None]).sum())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_explain_draws_a_time_plot_for_a_frame_target(ctc, tmp_path):
    _net, x, path, _ = ctc
    np.save(tmp_path / "x.npy", x[:1])
    r = CliRunner().invoke(cli.main, ["explain", str(path), str(tmp_path / "x.npy"), "-t", "steps:3-5:1", "-o",
                                      str(tmp_path / "a.png"), "-q", "--json"])
    assert r.exit_code == 0, r.output
    plot = tmp_path / "a_time.png"
    assert plot.is_file()
    with Image.open(plot) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert (np.abs(rgb.astype(int) - (255, 235, 180)).sum(-1) == 0).any()  # the explained frames, shaded


def test_explain_outlines_the_region_on_the_picture(unet, tmp_path):
    _net, x, path = unet
    Image.fromarray((x[0].transpose(1, 2, 0) * 255).astype(np.uint8)).resize((160, 160)).save(tmp_path / "in.png")
    args = ["explain", str(path), str(tmp_path / "in.png"), "-t", "region:4,4,12,12:0", "--size", "16,16", "--mean",
            "0,0,0", "--std", "1,1,1", "-q", "--plain"]
    r = CliRunner().invoke(cli.main, args + ["-o", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "a.png") as img:
        rgb = np.asarray(img.convert("RGB"))
    green = np.all(rgb == (0, 255, 0), axis=-1)
    scale = rgb.shape[0] / 16
    rows = np.flatnonzero(green.any(axis=1))
    assert green.any() and abs(rows.min() - 4 * scale) <= scale and abs(rows.max() - 12 * scale) <= scale
