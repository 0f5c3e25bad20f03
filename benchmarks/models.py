"""Benchmark models in plain torch (no torchvision), with fixed seeds, exported to ONNX.

- ``vgg16``: 13 3x3 convolutions with ReLU, 5 max pools (2x2, stride 2), 3 fully
  connected layers (hidden 4096), as in Simonyan & Zisserman 2015 configuration D.
  torchvision's adaptive average pool before the classifier is an identity at 224x224
  and is left out, so the classifier takes C * (R/32)^2 features.
- ``resnet50``: stem (7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool), Bottleneck blocks
  [3, 4, 6, 3] (1x1, 3x3, 1x1 convolutions, BatchNorm, residual add, projection shortcut
  with stride on the first block of a stage, stride on the 3x3 as in torchvision v1.5),
  global average pool, fully connected.
- ``mlp``: Flatten + Gemm/ReLU only: a model every onnxplain version supports, for
  smoke-testing the harness.

``width`` scales every channel count (and the VGG hidden size); ``resolution`` sets the
square input size. The full-size models use width 1.0 and resolution 224; ``--quick``
uses narrower, smaller ones.

Weights are drawn with a fixed seed (Kaiming normal). ResNet BatchNorm running
statistics are calibrated on random inputs so activations stay in a realistic range
and BatchNorm is not an identity (which would flatter constant folding).

``build(name, width, resolution)`` returns ``(torch_module, onnx_path, input_shape)``;
the ONNX file (opset 17, ``dynamo=False``, dynamic batch axis) and the weights are
cached under ``benchmarks/_work/`` so that every run, and torch and onnxruntime within
a run, use the very same weights.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import warnings

import torch
from torch import nn

WORK = Path(os.environ.get("ONNXPLAIN_BENCH_WORK", Path(__file__).resolve().parent / "_work"))
SEED = 20240601
NUM_CLASSES = 1000
OPSET = 17


def _c(ch: int, width: float) -> int:
    return max(4, int(round(ch * width)))


# ----------------------------------------------------------------------------- VGG-16

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    def __init__(self, width: float = 1.0, resolution: int = 224, num_classes: int = NUM_CLASSES):
        super().__init__()
        if resolution % 32:
            raise ValueError("VGG-16 needs a resolution divisible by 32")
        layers: list[nn.Module] = []
        cin = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = _c(v, width)
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=False)]
                cin = cout
        self.features = nn.Sequential(*layers)
        side = resolution // 32
        hidden = _c(4096, width)
        self.classifier = nn.Sequential(
            nn.Linear(cin * side * side, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# ----------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int = 1):
        super().__init__()
        cout = mid * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = NUM_CLASSES, blocks=(3, 4, 6, 3)):
        super().__init__()
        stem = _c(64, width)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = stem
        stages = []
        for i, n in enumerate(blocks):
            mid = _c(64 * 2**i, width)
            layer = []
            for j in range(n):
                layer.append(Bottleneck(cin, mid, stride=2 if (j == 0 and i > 0) else 1))
                cin = mid * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    def __init__(self, width: float = 1.0, resolution: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        hidden = _c(2048, width)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * resolution * resolution, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------- building

NAMES = ("vgg16", "resnet50", "mlp")
DISPLAY = {"vgg16": "VGG-16", "resnet50": "ResNet-50", "mlp": "MLP"}


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.01)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.normal_(m.bias, 0.0, 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)


def _calibrate_bn(model: nn.Module, shape, batches: int = 2, batch: int = 4) -> None:
    """Running statistics from random inputs (cumulative average), so BatchNorm is a real
    affine map at inference and activations keep a sane scale through the residual stack."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn((batch,) + tuple(shape)))
    model.eval()


def make(name: str, width: float = 1.0, resolution: int = 224) -> tuple[nn.Module, tuple]:
    """A freshly built, seeded model in eval mode with frozen weights, and its input shape (no batch)."""
    if name not in NAMES:
        raise ValueError(f"unknown model '{name}'; one of {', '.join(NAMES)}")
    torch.manual_seed(SEED)
    shape = (3, resolution, resolution)
    if name == "vgg16":
        model = VGG16(width, resolution)
    elif name == "resnet50":
        model = ResNet50(width)
    else:
        model = MLP(width, resolution)
    _init(model)
    _calibrate_bn(model, shape)
    model.eval()
    model.requires_grad_(False)
    return model, shape


def _key(name: str, width: float, resolution: int) -> str:
    src = inspect.getsource(inspect.getmodule(make))
    h = hashlib.sha1((src + torch.__version__).encode()).hexdigest()[:8]
    return f"{name}_w{width:g}_r{resolution}_{h}"


def build(name: str, width: float = 1.0, resolution: int = 224, verbose: bool = True):
    """(torch model in eval mode with frozen weights, path to its ONNX export, input shape without batch)."""
    WORK.mkdir(parents=True, exist_ok=True)
    key = _key(name, width, resolution)
    onnx_path = WORK / f"{key}.onnx"
    pt_path = WORK / f"{key}.pt"
    shape = (3, resolution, resolution)
    if onnx_path.exists() and pt_path.exists():
        model, shape = _skeleton(name, width, resolution)
        model.load_state_dict(torch.load(pt_path, weights_only=True))
        model.eval()
        model.requires_grad_(False)
        return model, onnx_path, shape
    if verbose:
        print(f"[models] building {name} (width {width:g}, {resolution}x{resolution}) -> {onnx_path.name}", flush=True)
    model, shape = make(name, width, resolution)
    export(model, shape, onnx_path)
    torch.save(model.state_dict(), pt_path)
    return model, onnx_path, shape


def _skeleton(name, width, resolution):
    if name == "vgg16":
        model = VGG16(width, resolution)
    elif name == "resnet50":
        model = ResNet50(width)
    else:
        model = MLP(width, resolution)
    return model, (3, resolution, resolution)


def export(model: nn.Module, shape, path: Path) -> None:
    x = torch.randn((1,) + tuple(shape))
    tmp = Path(str(path) + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is asked for on purpose
        torch.onnx.export(
            model, (x,), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    os.replace(tmp, path)


if __name__ == "__main__":  # python benchmarks/models.py [name width resolution]
    import sys

    import numpy as np
    import onnxruntime as ort

    args = sys.argv[1:]
    name = args[0] if args else "resnet50"
    width = float(args[1]) if len(args) > 1 else 0.25
    res = int(args[2]) if len(args) > 2 else 64
    model, path, shape = build(name, width, res)
    x = torch.randn((2,) + shape)
    ref = model(x).numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    print(path, "params", sum(p.numel() for p in model.parameters()), "max |torch - ort|", float(np.abs(ref - out).max()),
          "logit std", float(ref.std()))
