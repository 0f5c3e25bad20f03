"""Attention explanations of ViTs without a CLS token (the head averages the tokens, as
DeiT-style GAP heads and many timm models do) and of non-square patch grids, against numpy
implementations of the published equations on the maps and gradients torch computes.

The papers explain the CLS token's row of the rolled-out token-mixing matrix R (R[i, j]: how
much input token j makes up output token i). A head on the mean of the tokens reads
(1/T) sum_i x_i, so its row is the mean of R's rows: that is what is explained here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import transformer_zoo as tz
from onnxplain import Explainer
from onnxplain.errors import ModelError
from onnxplain.methods.transformers import patch_grid
from test_attention_maps import numpy_chefer, numpy_rollout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from train_vit import ShapeViT  # noqa: E402

TARGET = 1


def _vit(pool, size=16, seed=0):
    model = ShapeViT(size=size, patch=4, d=16, heads=2, blocks=2, classes=3, pool=pool).eval()
    tz.TinyEncoder.randomise(model, seed)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pooled")
    cache = {}

    def get(pool, size=16, exporter="torchscript"):
        key = (pool, size, exporter)
        if key not in cache:
            model = _vit(pool, size)
            h, w = model.size
            x = torch.randn((2, 3, h, w), generator=torch.Generator().manual_seed(1))
            path = tz.export(model, folder / f"vit_{pool}_{h}x{w}_{exporter}.onnx", exporter, x)
            cache[key] = (model, x, Explainer(str(path)))
        return cache[key]

    return get


def _matrix(method, model, x):
    """The method's rolled-out (batch, tokens, tokens) matrix, from torch's maps and gradients."""
    if method == "attention_rollout":
        return numpy_rollout(tz.attention_maps(model, x)[0])
    maps, grads = tz.attention_maps(model, x, TARGET)
    if method == "generic_attention":
        return numpy_chefer([g * a for g, a in zip(grads, maps)])
    _, modified = tz.attention_maps(model, x, TARGET, tz.ATTNLRP)
    return numpy_chefer([g * a * m for g, a, m in zip(grads, maps, modified)])


def _close(ours, ref, rtol=1e-3):
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("method", ["attention_rollout", "generic_attention", "transformer_attribution"])
def test_vit_without_cls_token_explains_the_mean_of_the_token_rows_on_the_patch_grid(exported, method):
    model, x, ex = exported("mean")
    ref = _matrix(method, model, x).mean(axis=1).reshape(-1, 1, 4, 4)  # every token is a patch
    coarse = ex.attribute(x.numpy(), method=method, target=TARGET, upsample=False)
    _close(coarse, ref)
    fine = ex.attribute(x.numpy(), method=method, target=TARGET)
    up = F.interpolate(torch.from_numpy(ref), size=(16, 16), mode="bilinear", align_corners=False).numpy()
    assert fine.shape == (2, 1, 16, 16)
    _close(fine, up)


def test_vit_without_cls_token_through_the_dynamo_exporter(exported):
    model, x, ex = exported("mean", exporter="dynamo")
    ref = _matrix("generic_attention", model, x).mean(axis=1).reshape(-1, 1, 4, 4)
    _close(ex.attribute(x.numpy(), method="generic_attention", target=TARGET, upsample=False), ref)


def test_an_explicit_query_on_a_mean_pooled_vit_reads_that_patch_tokens_row(exported):
    model, x, ex = exported("mean")
    ref = _matrix("attention_rollout", model, x)[:, 5].reshape(-1, 1, 4, 4)
    _close(ex.attribute(x.numpy(), method="attention_rollout", query="5", upsample=False), ref)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_a_non_square_image_maps_onto_its_rows_by_cols_patch_grid(exported, pool):
    """16 x 24 pixels in 4 x 4 patches: a 4 x 6 grid (with a CLS token: 25 tokens)."""
    model, x, ex = exported(pool, size=(16, 24))
    matrix = _matrix("attention_rollout", model, x)
    row = matrix[:, 0, 1:] if pool == "cls" else matrix.mean(axis=1)
    ref = row.reshape(-1, 1, 4, 6)
    _close(ex.attribute(x.numpy(), method="attention_rollout", upsample=False), ref)
    fine = ex.attribute(x.numpy(), method="attention_rollout")
    up = F.interpolate(torch.from_numpy(ref), size=(16, 24), mode="bilinear", align_corners=False).numpy()
    _close(fine, up)


def test_patch_grids_are_told_apart_by_their_token_count():
    assert patch_grid(65, (32, 32)) == (1, 8, 8)
    assert patch_grid(64, (32, 32)) == (0, 8, 8)
    assert patch_grid(25, (16, 24)) == (1, 4, 6)
    assert patch_grid(197, (224, 224)) == (1, 14, 14)
    assert patch_grid(196, (224, 224)) == (0, 14, 14)


@pytest.mark.parametrize("tokens", [66, 68])  # DeiT's distillation token; four register tokens
def test_a_vit_with_more_prefix_tokens_is_refused_by_its_token_count(tokens):
    with pytest.raises(ModelError, match=f"{tokens} tokens are neither a CLS token and a grid"):
        patch_grid(tokens, (32, 32))
