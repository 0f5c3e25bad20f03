"""A Vision Transformer in plain torch for the GPU benchmark (no timm or torchvision, so
the same module runs here and on a lent device), exported like models.py's.

``vit``: ViT-B/16 (Dosovitskiy et al. 2021): 16x16 patch embedding (a strided Conv),
class token, learned position embeddings, 12 pre-norm blocks of multi-head self-attention
(12 heads, written out as MatMul/Softmax so the exported graph is the plain operators a
user's export holds) and a GELU MLP (3072), final LayerNorm, linear head on the class
token. ``width`` scales the embedding (heads keep 64 channels), ``depth`` the blocks.
Weights are random with a fixed seed (timing does not depend on them).

``build_vit(width, resolution, depth)`` returns ``(torch module, onnx path, input shape)``
and caches the export under models.WORK, as models.build does.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

import models


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        qkv = self.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h)), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, width: float = 1.0, resolution: int = 224, depth: int = 12, patch: int = 16,
                 num_classes: int = models.NUM_CLASSES):
        super().__init__()
        if resolution % patch:
            raise ValueError(f"ViT needs a resolution divisible by the patch size {patch}")
        heads = max(1, int(round(12 * width)))
        dim = 64 * heads
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (resolution // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, 4 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def make_vit(width: float = 1.0, resolution: int = 224, depth: int = 12) -> nn.Module:
    torch.manual_seed(models.SEED)
    model = ViT(width, resolution, depth)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.01)
    nn.init.trunc_normal_(model.pos, std=0.02)
    nn.init.trunc_normal_(model.cls, std=0.02)
    model.eval()
    model.requires_grad_(False)
    return model


def build_vit(width: float = 1.0, resolution: int = 224, depth: int = 12, verbose: bool = True):
    """(torch ViT in eval mode with frozen weights, path to its ONNX export, input shape without batch)."""
    models.WORK.mkdir(parents=True, exist_ok=True)
    import hashlib
    import inspect
    import sys

    src = inspect.getsource(sys.modules[__name__])
    key = hashlib.sha1((src + torch.__version__).encode()).hexdigest()[:8]
    stem = f"vit_w{width:g}_r{resolution}_d{depth}_{key}"
    onnx_path, pt_path = models.WORK / f"{stem}.onnx", models.WORK / f"{stem}.pt"
    shape = (3, resolution, resolution)
    if onnx_path.exists() and pt_path.exists():
        model = ViT(width, resolution, depth)
        model.load_state_dict(torch.load(pt_path, weights_only=True))
        model.eval()
        model.requires_grad_(False)
        return model, onnx_path, shape
    if verbose:
        print(f"[gpu_models] building vit (width {width:g}, {resolution}x{resolution}, depth {depth}) -> "
              f"{onnx_path.name}", flush=True)
    model = make_vit(width, resolution, depth)
    tmp = Path(str(onnx_path) + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn((1,) + shape),), str(tmp), dynamo=False, opset_version=models.OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    os.replace(tmp, onnx_path)
    torch.save(model.state_dict(), pt_path)
    return model, onnx_path, shape
