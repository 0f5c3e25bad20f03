"""Layer attributions (`layer=`), conductance, neuron conductance and IPNA agree with Captum
and with their axioms; the pruning study runs end to end from Python and the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from captum.attr import LayerConductance, LayerIntegratedGradients, NeuronConductance
from click.testing import CliRunner
from torch import nn

import zoo
from onnxplain import Explainer
from onnxplain.cli import main
from onnxplain.errors import OptionError
from onnxplain.methods.conductance import prune_channels, prune_study

TARGET = [1, 4]
TOL = 2e-5


def assert_agrees(ours, ref, tol=TOL):
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max()) / max(float(np.abs(ref).max()), 1e-12)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def _activation(model, module, x):
    acts = []
    hook = module.register_forward_hook(lambda m, i, o: acts.append(o.detach().numpy()))
    model(torch.tensor(x))
    hook.remove()
    return acts[0]


def tensor_of(e, model, module, x) -> str:
    """The ONNX tensor that holds `module`'s output (the last one, if copies exist)."""
    want = _activation(model, module, x)
    feeds = e._feeds(x)
    names = [o for n in e.graph.nodes for o in n.output
             if tuple((e.graph.shape(o) or ())[1:]) == want.shape[1:] and e.graph.is_float(o)]
    values = e._forward(feeds, names)
    found = [o for o in names if np.allclose(values[o], want, atol=1e-5)]
    assert found, "no tensor of the export matches the module's output"
    return found[-1]


@pytest.fixture(params=zoo.EXPORTERS)
def resnet(request, exported):
    model, path = exported("resnet", request.param)
    x = np.random.default_rng(2).normal(size=(2,) + type(model).shape).astype(np.float32)
    return model, Explainer(path), x


# ----------------------------------------------------------------------------- layer= (issue 5, item 2)


@pytest.mark.parametrize("module", ["stem.1", "layer1", "layer2"])
def test_layer_gradient_equals_the_torch_activation_gradient(resnet, module):
    model, e, x = resnet
    mod = model.get_submodule(module)
    acts = []

    def keep(m, i, o):
        o.retain_grad()
        acts.append(o)

    hook = mod.register_forward_hook(keep)
    xt = torch.tensor(x, requires_grad=True)
    out = model(xt)
    hook.remove()
    out[torch.arange(2), TARGET].sum().backward()
    ours = e.attribute(x, method="gradient", target=TARGET, layer=tensor_of(e, model, mod, x))
    assert_agrees(ours, acts[0].grad.numpy())


@pytest.mark.parametrize("module", ["stem.1", "layer1", "layer1.relu1", "layer2"])
@pytest.mark.parametrize("baseline", [0.0, 0.3])
def test_layer_integrated_gradients_equals_captum(resnet, module, baseline):
    """The layer's value moves between its values at baseline and input while paths that
    bypass it (layer1.relu1 lies inside a residual block) see the real input, as in Captum."""
    model, e, x = resnet
    mod = model.get_submodule(module)
    base = np.full_like(x, baseline)
    ref = LayerIntegratedGradients(model, mod).attribute(torch.tensor(x), baselines=torch.tensor(base),
                                                        target=TARGET, n_steps=16)
    ours = e.attribute(x, method="integrated_gradients", target=TARGET, layer=tensor_of(e, model, mod, x),
                       n_steps=16, baseline=baseline)
    assert_agrees(ours, ref.detach().numpy())


def test_layer_integrated_gradients_is_complete_along_the_layer_path(resnet):
    """Completeness at a layer: the attributions sum to f(x) - f(x with the layer at its
    baseline value), the other paths still fed x."""
    model, e, x = resnet
    mod = model.layer1.relu1
    base = np.zeros_like(x)
    ours = e.attribute(x, method="integrated_gradients", target=TARGET, layer=tensor_of(e, model, mod, x),
                       n_steps=64, baseline=base)
    b_act = torch.tensor(_activation(model, mod, base))
    hook = mod.register_forward_hook(lambda m, i, o: b_act)
    with torch.no_grad():
        patched = model(torch.tensor(x)).numpy()
    hook.remove()
    with torch.no_grad():
        full = model(torch.tensor(x)).numpy()
    rows = np.arange(2)
    want = full[rows, TARGET] - patched[rows, TARGET]
    np.testing.assert_allclose(ours.reshape(2, -1).sum(axis=1), want, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- conductance


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
@pytest.mark.parametrize("module", ["layer1", "layer2"])
def test_conductance_equals_captum_layer_conductance(resnet, module, rule):
    model, e, x = resnet
    mod = model.get_submodule(module)
    base = np.full_like(x, 0.1)
    ref = LayerConductance(model, mod).attribute(torch.tensor(x), baselines=torch.tensor(base), target=TARGET,
                                                 n_steps=12, method=rule)
    ours = e.attribute(x, method="conductance", target=TARGET, layer=tensor_of(e, model, mod, x), n_steps=12,
                       integration=rule, baseline=base)
    assert_agrees(ours, ref.detach().numpy())


def test_conductances_sum_to_the_integrated_gradients_total(resnet):
    model, e, x = resnet
    layer = tensor_of(e, model, model.layer1, x)
    cond = e.attribute(x, method="conductance", target=TARGET, layer=layer, n_steps=200)
    ig = e.attribute(x, method="integrated_gradients", target=TARGET, n_steps=200)
    delta = (e.predict(x) - e.predict(np.zeros_like(x)))[np.arange(2), TARGET]
    np.testing.assert_allclose(cond.reshape(2, -1).sum(1), delta, rtol=1e-2, atol=1e-4)
    np.testing.assert_allclose(cond.reshape(2, -1).sum(1), ig.reshape(2, -1).sum(1), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("rule", ["riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("module", ["layer1", "layer2"])
def test_neuron_conductance_equals_captum(resnet, module, rule):
    model, e, x = resnet
    mod = model.get_submodule(module)
    layer = tensor_of(e, model, mod, x)
    for neuron in [(3, 2, 5), (0, 7, 0)]:
        ref = NeuronConductance(model, mod).attribute(torch.tensor(x), neuron_selector=neuron,
                                                               target=TARGET, n_steps=10, method=rule)
        ours = e.attribute(x, method="neuron_conductance", target=TARGET, layer=layer, neuron=neuron,
                           n_steps=10, integration=rule)
        assert_agrees(ours, ref.detach().numpy())


def test_channel_conductance_is_the_sum_over_its_neurons(resnet):
    model, e, x = resnet
    layer = tensor_of(e, model, model.layer2, x)
    nc = NeuronConductance(model, model.layer2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sum(nc.attribute(torch.tensor(x), neuron_selector=(5, i, j), target=TARGET, n_steps=6).detach().numpy()
                  for i in range(8) for j in range(8))
    ours = e.attribute(x, method="neuron_conductance", target=TARGET, layer=layer, neuron=5, n_steps=6)
    assert_agrees(ours, ref, tol=1e-4)


def test_conductance_methods_need_a_layer_and_a_valid_neuron(resnet):
    model, e, x = resnet
    with pytest.raises(OptionError, match="layer"):
        e.attribute(x, method="conductance", target=TARGET)
    layer = tensor_of(e, model, model.layer2, x)
    with pytest.raises(OptionError, match="out of range"):
        e.attribute(x, method="neuron_conductance", target=TARGET, layer=layer, neuron=(16,))
    with pytest.raises(OptionError, match="entries"):
        e.attribute(x, method="neuron_conductance", target=TARGET, layer=layer, neuron=(1, 2))
    with pytest.raises(OptionError, match="box"):
        e.attribute(x, method="ipna", target=TARGET, layer=layer, box=(0, 0, 17, 4))


# ----------------------------------------------------------------------------- IPNA


def test_ipna_of_the_whole_input_is_the_conductance(resnet):
    model, e, x = resnet
    layer = tensor_of(e, model, model.layer1, x)
    whole = e.attribute(x, method="ipna", target=TARGET, layer=layer, box=(0, 0, 16, 16), n_steps=8)
    assert_agrees(whole, e.attribute(x, method="conductance", target=TARGET, layer=layer, n_steps=8), tol=1e-6)


def test_ipna_is_neuron_conductance_summed_over_the_box(resnet):
    """The finite-difference IPNA converges to the exact sum over the box of each channel's
    neuron conductance."""
    model, e, x = resnet
    layer = tensor_of(e, model, model.layer2, x)
    box = (2, 3, 10, 9)
    ipna = e.attribute(x, method="ipna", target=TARGET, layer=layer, box=box, n_steps=64)
    per_channel = ipna.reshape(2, 16, -1).sum(2)
    exact = np.stack([
        e.attribute(x, method="neuron_conductance", target=TARGET, layer=layer, neuron=c, n_steps=64,
                    integration="gausslegendre")[:, :, 3:9, 2:10].sum((1, 2, 3)) for c in range(16)], 1)
    assert_agrees(per_channel, exact, tol=3e-2)


class Quadrants(nn.Module):
    """Channel c of the hidden layer sees only quadrant c of the 8x8 input; channel 0 has the
    smallest weight in the head, so it contributes least to the whole but all of the top-left."""

    shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        mask = torch.zeros(1, 4, 8, 8)
        for c, (i, j) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            mask[0, c, i:i + 4, j:j + 4] = 1.0
        self.register_buffer("mask", mask)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 1.5, 2.0, 2.5]).view(4, 1, 1, 1))
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[0.5, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        h = self.relu(self.conv(x) * self.mask)
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def quadrants(tmp_path_factory):
    model = Quadrants().eval()
    path = zoo.export(model, tmp_path_factory.mktemp("quad") / "quadrants.onnx", "torchscript")
    e = Explainer(path)
    layer = next(n.output[0] for n in e.graph.nodes if n.op_type == "Relu")
    x = np.random.default_rng(0).uniform(0.5, 1.0, size=(1, 1, 8, 8)).astype(np.float32)
    return e, layer, x, path


def test_ipna_ranks_first_the_channel_that_sees_the_box(quadrants):
    e, layer, x, _ = quadrants
    ipna = e.attribute(x, method="ipna", target=0, layer=layer, box=(0, 0, 4, 4), n_steps=16).sum((0, 2, 3))
    cond = e.attribute(x, method="conductance", target=0, layer=layer, n_steps=16).sum((0, 2, 3))
    assert np.argmax(ipna) == 0
    np.testing.assert_allclose(ipna[1:], 0.0, atol=1e-7)
    assert list(np.argsort(-cond)) == [3, 2, 1, 0]


def test_pruning_the_ipna_channel_removes_the_attribution_inside_the_box(quadrants):
    e, layer, x, _ = quadrants
    result = prune_study(e, x, layer, (0, 0, 4, 4), target=0, ks=(1, 2), n_steps=16)
    rows = {(r["ranking"], r["k"]): r for r in result["rows"]}
    assert result["rankings"]["ipna"][0] == 0 and result["rankings"]["conductance"][0] == 3
    assert rows[("ipna", 1)]["inside"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("ipna", 1)]["outside"] == pytest.approx(result["unpruned"]["outside"], rel=1e-5)
    assert rows[("conductance", 1)]["inside"] == pytest.approx(result["unpruned"]["inside"], rel=1e-5)
    assert rows[("conductance", 2)]["outside"] < rows[("conductance", 1)]["outside"]


def test_pruned_model_zeroes_the_channels(quadrants):
    import onnx

    e, layer, x, _ = quadrants
    pruned = Explainer(prune_channels(e.graph.model, layer, [1, 3]), canonize=False)
    model = Quadrants().eval()
    with torch.no_grad():
        model.fc.weight[:, [1, 3]] = 0.0
    np.testing.assert_allclose(pruned.predict(x), model(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert isinstance(pruned.graph.model, onnx.ModelProto)


# ----------------------------------------------------------------------------- CLI


def test_prune_study_cli_writes_the_table_and_the_plot(quadrants, tmp_path):
    from PIL import Image

    _, layer, x, path = quadrants
    np.save(tmp_path / "x.npy", x)
    out, plot = tmp_path / "table.json", tmp_path / "plot.png"
    res = CliRunner().invoke(main, ["prune-study", str(path), str(tmp_path / "x.npy"), "--layer", layer,
                                    "--box", "0,0,4,4", "--target", "0", "--k", "1,2,4", "--n-steps", "8",
                                    "--out", str(out), "--plot", str(plot), "-q"])
    assert res.exit_code == 0, res.output
    assert "ipna" in res.output and "conductance" in res.output
    table = json.loads(out.read_text())
    assert [(r["ranking"], r["k"]) for r in table["rows"]] == [("none", 0)] + [
        (r, k) for r in ("ipna", "conductance") for k in (1, 2, 4)]
    assert Image.open(plot).size == (640, 400)


@pytest.mark.parametrize("args,message", [
    (["--box", "0,0,4"], "x1,y1,x2,y2"),
    (["--box", "4,0,2,4"], "x1 < x2"),
    (["--box", "0,0,4,40"], "not inside"),
    (["--box", "0,0,4,4", "--k", "0"], "positive integers"),
    (["--box", "0,0,4,4", "--k", "9"], "channels"),
    (["--box", "0,0,4,4", "--out", "table.txt"], ".json"),
])
def test_prune_study_cli_bad_options_exit_2_with_one_line(quadrants, tmp_path, args, message):
    _, layer, x, path = quadrants
    np.save(tmp_path / "x.npy", x)
    res = CliRunner().invoke(main, ["prune-study", str(path), str(tmp_path / "x.npy"), "--layer", layer,
                                    "--n-steps", "4", "-q"] + args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
