"""Train the small ViT shipped as models/tiny_vit.onnx once, and export it.

    .venv-ci/bin/python models/train_vit.py        # writes models/tiny_vit.onnx

Seeded (numpy and torch), CPU only, one thread: synthetic 32x32 scenes of one shape
(square, circle, triangle, cross; tests/shape_scenes.py) on textured noise, drawn fresh for
every batch, class = shape. The model is a plain ViT: 4x4 patches by a strided Conv, a CLS
token, learned position embeddings, pre-LayerNorm blocks of multi-head self-attention and a
GELU MLP with residual sums (tests/transformer_zoo.Block, eager attention), a final
LayerNorm and a linear head on the CLS token. Exported by the TorchScript exporter
(dynamo=False, opset 17) with onnxplain's preprocessing metadata; onnxruntime is checked
against torch (< 1e-4) and the accuracy on held-out scenes is printed with the file's
sha256 (recorded in models/README.md).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import shape_scenes  # noqa: E402
from transformer_zoo import Block  # noqa: E402

PREPROCESS = {"size": [32, 32], "resize": [32, 32], "crop": "none", "interpolation": "bilinear",
              "mean": [shape_scenes.MEAN] * 3, "std": [shape_scenes.STD] * 3, "layout": "nchw",
              "channels": "rgb", "scale": 1.0 / 255.0, "labels": "tiny_vit_classes.txt"}


class ShapeViT(nn.Module):
    """Images (batch, 3, H, W) (size: 32, or (H, W)) -> logits (batch, 4). pool="cls" reads the CLS token;
    pool="mean" has no CLS token and averages the tokens (DeiT-style GAP heads)."""

    def __init__(self, size=32, patch=4, d=64, heads=4, blocks=3, classes=len(shape_scenes.CLASSES),
                 pool="cls"):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)
        self.patch, self.pool = patch, pool
        self.patches = nn.Conv2d(3, d, patch, stride=patch)
        n = (self.size[0] // patch) * (self.size[1] // patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.randn(1, n + (pool == "cls"), d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def set_mode(self, mode):
        """The reference passes of tests/transformer_zoo (relevance by detach tricks)."""
        for blk in self.blocks:
            blk.mode = mode
        return self

    def forward(self, img):
        x = self.patches(img).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.blocks[0].norm(self.ln, x)
        return self.head(x[:, 0] if self.cls is not None else x.mean(1))


def batch(rng, n):
    images, labels, _ = shape_scenes.scenes(n, rng)
    return torch.from_numpy(shape_scenes.normalise(images)), torch.from_numpy(labels)


def accuracy(model, rng, n=1000) -> float:
    x, y = batch(rng, n)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(steps: int = 3000, batch_size: int = 64, seed: int = 0) -> ShapeViT:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    model = ShapeViT()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = batch(rng, batch_size)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    import onnx
    import onnxruntime as ort

    x, _ = batch(np.random.default_rng(1), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "onnxplain.preprocess", json.dumps(PREPROCESS, sort_keys=True)
    proto.doc_string = ("Small ViT (4x4 patches, CLS token, 3 pre-LN blocks, dim 64, 4 heads) trained on synthetic "
                        "shapes (square, circle, triangle, cross) on textured noise. Built by models/train_vit.py.")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def main(out: Path = HERE / "tiny_vit.onnx") -> None:
    model = train()
    print(f"held-out accuracy {accuracy(model, np.random.default_rng(12345)):.3f} (1000 scenes)")
    export(model, out)
    print(out.name, out.stat().st_size, "bytes, sha256", hashlib.sha256(out.read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
