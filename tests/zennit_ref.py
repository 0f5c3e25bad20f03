"""Zennit (and Captum) as references for the relevance methods, and the plain-torch models
they are compared on.

`import zennit` imports torchvision, which must not be installed here (it breaks torch):
a minimal stub of the three torchvision modules Zennit touches is put in sys.modules first.
Residual additions are written so that Zennit sees them as its `Sum` layer (what its ResNet
canonizer does for torchvision's blocks) while the ONNX export sees a plain Add.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _stub_torchvision():
    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")

    class BasicBlock(nn.Module):
        pass

    class Bottleneck(nn.Module):
        pass

    resnet.BasicBlock, resnet.Bottleneck = BasicBlock, Bottleneck
    tv.models, models.resnet = models, resnet
    sys.modules.update({"torchvision": tv, "torchvision.models": models, "torchvision.models.resnet": resnet})


_stub_torchvision()

import zennit  # noqa: E402,F401
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox,  # noqa: E402
                               EpsilonPlus, EpsilonPlusFlat, ExcitationBackprop, LayerMapComposite,
                               layer_map_base)
from zennit.layer import Sum  # noqa: E402
from zennit.rules import Epsilon  # noqa: E402
from zennit.types import Linear  # noqa: E402

# Zennit holds what it needs; the stub must not make torch.onnx think torchvision is there.
for _name in ("torchvision.models.resnet", "torchvision.models", "torchvision"):
    sys.modules.pop(_name, None)


# ----------------------------------------------------------------------------- models
class Residual(nn.Module):
    """a + b: a zennit Sum over a stacked axis when `zennit_mode`, a plain add otherwise."""

    def __init__(self):
        super().__init__()
        self.sum = Sum(dim=-1)
        self.zennit_mode = False

    def forward(self, a, b):
        if self.zennit_mode:
            return self.sum(torch.stack([a, b], dim=-1))
        return a + b


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial statistics, so that folding them matters
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.6, 1.4)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class MLP(nn.Module):
    shape = (20,)

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.net(x)


class VGG(nn.Module):
    shape = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), _bn(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn(cout)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _bn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
        self.add = Residual()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add(out, x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), _bn(mid), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
        self.add = Residual()
        self.relu3 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(self.add(out, x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    shape = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), _bn(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.layer3 = Bottleneck(16, 8, 32, 1)
        self.layer4 = Bottleneck(32, 8, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expand, stride):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), _bn(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), _bn(cout),
        )
        self.add = Residual() if stride == 1 and cin == cout else None

    def forward(self, x):
        out = self.body(x)
        return out if self.add is None else self.add(out, x)


class MobileNet(nn.Module):
    shape = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), _bn(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 2, 1), InvertedResidual(8, 16, 2, 2),
                                    InvertedResidual(16, 16, 2, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        # Post-activation order (conv, BN, ReLU) so that BN merges into the conv before it.
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)
        self.bn = _bn(growth)
        self.relu = nn.ReLU()

    def forward(self, x):
        return torch.cat([x, self.relu(self.bn(self.conv(x)))], 1)


class DenseNet(nn.Module):
    shape = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.block1 = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.trans = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


MODELS = {"mlp": MLP, "vgg": VGG, "resnet": ResNet, "mobilenet": MobileNet, "densenet": DenseNet}
EXPORTERS = ("torchscript", "dynamo")


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = MODELS[name]().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def set_zennit_mode(model: nn.Module, on: bool):
    for mod in model.modules():
        if isinstance(mod, Residual):
            mod.zennit_mode = on


def export(model: nn.Module, path: Path, exporter: str, batch: int = 2) -> Path:
    x = torch.randn((batch,) + type(model).shape)
    set_zennit_mode(model, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


# ----------------------------------------------------------------------------- references
def zennit_composite(name: str, low=None, high=None, **kw):
    canon = [SequentialMergeBatchNorm()]
    if name == "lrp.epsilon":
        return LayerMapComposite(layer_map_base() + [(Linear, Epsilon(**kw))], canonizers=canon)
    if name == "excitation_backprop":
        return ExcitationBackprop(zero_params="bias", canonizers=canon, **kw)
    cls = {"lrp.epsilon_plus": EpsilonPlus, "lrp.epsilon_plus_flat": EpsilonPlusFlat,
           "lrp.epsilon_gamma_box": EpsilonGammaBox, "lrp.epsilon_alpha2_beta1": EpsilonAlpha2Beta1,
           "lrp.epsilon_alpha2_beta1_flat": EpsilonAlpha2Beta1Flat}[name]
    if cls is EpsilonGammaBox:
        return cls(low=low, high=high, canonizers=canon, **kw)
    return cls(canonizers=canon, **kw)


def zennit_relevance(model: nn.Module, x: np.ndarray, seed: np.ndarray, name: str, **kw) -> np.ndarray:
    """Zennit's attribution of composite `name` for input x and output seed."""
    set_zennit_mode(model, True)
    try:
        if name == "lrp.epsilon_gamma_box":
            shape = (1,) + x.shape[1:]
            kw["low"] = torch.full(shape, float(kw.pop("low")))
            kw["high"] = torch.full(shape, float(kw.pop("high")))
        composite = zennit_composite(name, **kw)
        xt = torch.tensor(x, requires_grad=True)
        with Gradient(model=model, composite=composite) as attributor:
            _, rel = attributor(xt, torch.tensor(seed))
        return rel.detach().numpy()
    finally:
        set_zennit_mode(model, False)


def captum_deeplift(model: nn.Module, x: np.ndarray, target, baseline=0.0) -> np.ndarray:
    from captum.attr import DeepLift

    xt = torch.tensor(x, requires_grad=True)
    base = torch.full_like(xt, float(baseline)) if np.isscalar(baseline) else torch.tensor(baseline)
    return DeepLift(model).attribute(xt, baselines=base, target=target).detach().numpy()
