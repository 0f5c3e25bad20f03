"""Small transformers written in plain torch, their ONNX exports, and reference relevance.

`TinyEncoder`: token embedding (+ a learned position table) -> blocks of pre-LayerNorm
multi-head self-attention (softmax, eager or torch's scaled_dot_product_attention) and a
GELU MLP with residual sums -> final LayerNorm -> mean over tokens -> linear head.
`TinyViT`: the same blocks on patch embeddings (a strided Conv) with a CLS token.
`gated=True`: LLaMA's blocks (RMSNorm, a SiLU-gated MLP); `Block.einsum`: attention
products written as torch.einsum. `hf_model`: random BERT/GPT-2 from transformers configs.

The references are the published rules written as torch autograd: relevance is
gradient x input on a copy of the forward pass in which the non-conservative parts are
replaced by their rule (detach tricks), so that the chain rule applies the rule:
- identity rule of f: x * (f(x) / x).detach()
- LayerNorm with the variance held constant: (x - mean) / std.detach() * w + b
- uniform rule of a product of two computed tensors: each operand's gradient halved
- softmax: its gradient (R_x = x (R - s sum R) is gradient x input when R = s g)
- CP-LRP: the attention probabilities detached
Every linear layer's epsilon rule (epsilon -> 0) is then its plain gradient x input.
Mode LXT instead runs lxt's explicit AttnLRP functions (lxt.explicit.functional), whose
backward pass carries relevance itself, seeded with the logit.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

EXPORTERS = ("torchscript", "dynamo")


class _Half(torch.autograd.Function):
    """Identity forward; the gradient halved (the uniform rule's share of one operand)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 0.5


def _identity_rule(x, y):
    """y, with the gradient y / x: the identity rule of y = f(x) under gradient x input."""
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return x * torch.where(x == 0, torch.zeros_like(y), y / safe).detach()


# modes of the reference passes
PLAIN, ATTNLRP, CPLRP, CPLRP_GRADIENT = "plain", "attnlrp", "cp_lrp", "cp_lrp_gradient"
# lxt's explicit AttnLRP rules (lxt.explicit.functional): the backward pass carries relevance.
LXT = "lxt"


def _lxt():
    import lxt.explicit.functional as lf

    return lf


class _Identity(torch.autograd.Function):
    """An element-wise function under explicit relevance: the identity rule."""

    @staticmethod
    def forward(ctx, x, f):
        return f(x)

    @staticmethod
    def backward(ctx, r):
        return r, None


def _linear(layer, x, mode):
    return _lxt().linear_epsilon(x, layer.weight, layer.bias) if mode == LXT else layer(x)


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps


class Block(nn.Module):
    """Pre-norm attention block; gated=True is LLaMA's: RMSNorm and a SiLU-gated MLP."""

    def __init__(self, d, heads, sdpa=False, gated=False):
        super().__init__()
        self.heads, self.sdpa, self.gated = heads, sdpa, gated
        norm = RMSNorm if gated else nn.LayerNorm
        self.ln1, self.ln2 = norm(d), norm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.fc3 = nn.Linear(d, 2 * d) if gated else None
        self.mode = PLAIN
        self.einsum = False  # attention products as torch.einsum (exported as Einsum)
        self.probs = None  # the last attention probabilities (batch, heads, tokens, tokens)

    def norm(self, ln, x):
        if self.mode == LXT:
            if isinstance(ln, RMSNorm):
                return _lxt().rms_norm_identity(x, ln.weight, ln.eps)
            return _lxt().layer_norm(x, ln.weight, ln.bias, ln.eps)
        if isinstance(ln, RMSNorm):
            rms = torch.sqrt((x * x).mean(-1, keepdim=True) + ln.eps)
            return x / (rms if self.mode == PLAIN else rms.detach()) * ln.weight
        if self.mode == PLAIN:
            return ln(x)
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + ln.eps).detach() * ln.weight + ln.bias

    def attention(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = _linear(self.qkv, x, self.mode).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if self.mode == LXT:
            lf = _lxt()
            self.probs = lf.softmax(lf.matmul(q, k.transpose(-2, -1)), -1, temperature=math.sqrt(d // h))
            out = lf.matmul(self.probs, v)
            return lf.linear_epsilon(out.transpose(1, 2).reshape(b, t, d), self.proj.weight, self.proj.bias)
        if self.sdpa and self.mode == PLAIN:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            if self.einsum:
                qk, av = (lambda a, b: torch.einsum("bhqd,bhkd->bhqk", a, b)), \
                    (lambda a, b: torch.einsum("bhqk,bhkd->bhqd", a, b))
            else:
                qk, av = (lambda a, b: a @ b.transpose(-2, -1)), (lambda a, b: a @ b)
            if self.mode == ATTNLRP:
                scores = qk(_Half.apply(q), _Half.apply(k)) / math.sqrt(d // h)
            else:
                scores = qk(q, k) / math.sqrt(d // h)
            probs = scores.softmax(-1)
            self.probs = probs
            if self.mode in (CPLRP, CPLRP_GRADIENT):
                out = av(probs.detach(), v)
            elif self.mode == ATTNLRP:
                out = av(_Half.apply(probs), _Half.apply(v))
            else:
                out = av(probs, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def gelu(self, x):
        f = F.silu if self.gated else F.gelu
        if self.mode == LXT:
            return _Identity.apply(x, f)
        y = f(x)
        return _identity_rule(x, y) if self.mode in (ATTNLRP, CPLRP) else y

    def mlp(self, x):
        h = self.gelu(_linear(self.fc1, x, self.mode))
        if self.gated:
            g = _linear(self.fc3, x, self.mode)
            if self.mode == LXT:
                h = _lxt().mul2(h, g)
            else:
                h = _Half.apply(h) * _Half.apply(g) if self.mode in (ATTNLRP, CPLRP, CPLRP_GRADIENT) else h * g
        return _linear(self.fc2, h, self.mode)

    def forward(self, x):
        add = _lxt().add2 if self.mode == LXT else torch.add
        x = add(x, self.attention(self.norm(self.ln1, x)))
        return add(x, self.mlp(self.norm(self.ln2, x)))


class TinyEncoder(nn.Module):
    """Token ids (batch, tokens) -> class logits."""

    vocab, tokens, d, heads, classes = 20, 6, 16, 2, 3

    def __init__(self, sdpa=False, blocks=2, gated=False):
        super().__init__()
        self.embed = nn.Embedding(self.vocab, self.d)
        self.pos = nn.Parameter(torch.randn(1, self.tokens, self.d) * 0.3)
        self.blocks = nn.ModuleList(Block(self.d, self.heads, sdpa, gated) for _ in range(blocks))
        self.ln = RMSNorm(self.d) if gated else nn.LayerNorm(self.d)
        self.head = nn.Linear(self.d, self.classes)
        self.randomise()

    def randomise(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.2))
            for m in self.modules():
                if isinstance(m, (nn.LayerNorm, RMSNorm)):
                    m.weight.add_(1.0)
        return self

    def zero_biases(self):
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias") or name == "pos":
                    p.zero_()
        return self

    def set_mode(self, mode):
        for blk in self.blocks:
            blk.mode = mode
        self.mode = mode
        return self

    def from_embedding(self, e):
        if getattr(self, "mode", PLAIN) == LXT:
            lf = _lxt()
            x = lf.add2(e, self.pos.expand_as(e))
            for blk in self.blocks:
                x = blk(x)
            return lf.linear_epsilon(lf.mean(self.blocks[0].norm(self.ln, x), 1, False), self.head.weight,
                                     self.head.bias)
        x = e + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.blocks[0].norm(self.ln, x).mean(1))

    def forward(self, ids):
        return self.from_embedding(self.embed(ids))

    def example(self, batch=2, seed=1):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab, (batch, self.tokens), generator=g)


class TinyViT(nn.Module):
    """Images (batch, 3, 16, 16) -> class logits through 4x4 patches and a CLS token."""

    size, patch, d, heads, classes = 16, 4, 16, 2, 3

    def __init__(self, sdpa=False, blocks=2):
        super().__init__()
        self.patches = nn.Conv2d(3, self.d, self.patch, stride=self.patch)
        self.cls = nn.Parameter(torch.randn(1, 1, self.d))
        n = (self.size // self.patch) ** 2 + 1
        self.pos = nn.Parameter(torch.randn(1, n, self.d) * 0.3)
        self.blocks = nn.ModuleList(Block(self.d, self.heads, sdpa) for _ in range(blocks))
        self.ln = nn.LayerNorm(self.d)
        self.head = nn.Linear(self.d, self.classes)
        TinyEncoder.randomise(self)

    set_mode = TinyEncoder.set_mode

    def forward(self, img):
        p = self.patches(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(p.shape[0], -1, -1), p], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.blocks[0].norm(self.ln, x)[:, 0])

    def example(self, batch=2, seed=1):
        return torch.randn((batch, 3, self.size, self.size), generator=torch.Generator().manual_seed(seed))


def export(model: nn.Module, path: Path, exporter: str, example, opset: int = 17) -> Path:
    """ONNX export with a dynamic batch; token models take `input_ids`, images `pixels`.
    TorchScript before opset 17 decomposes LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div); dynamo
    at opset 23 writes SDPA as the `Attention` operator."""
    name = "input_ids" if example.dtype == torch.int64 else "pixels"
    for blk in model.blocks:
        blk.mode = PLAIN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            # dynamo: its own opset unless a later one is asked for (23: SDPA as `Attention`)
            extra = {"opset_version": opset} if opset > 20 else {}
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=[name], output_names=["logits"],
                              **extra,
                              dynamic_shapes={list(model.forward.__code__.co_varnames)[1]: {0: torch.export.Dim("batch")}},
                              verbose=False)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[name],
                              output_names=["logits"], dynamic_axes={name: {0: "batch"}, "logits": {0: "batch"}})
    return path


def relevance(model: TinyEncoder, ids: torch.Tensor, target: int, mode: str) -> torch.Tensor:
    """Reference relevance at the embedding output: gradient x input of the `mode` pass."""
    model.set_mode(mode)
    try:
        e = model.embed(ids).detach().requires_grad_(True)
        out = model.from_embedding(e)
        if mode == LXT:  # explicit relevance, starting at the logit
            seed = torch.zeros_like(out)
            seed[:, target] = out[:, target].detach()
            out.backward(seed)
            return e.grad.detach()
        out[:, target].sum().backward()
        return (e * e.grad).detach()
    finally:
        model.set_mode(PLAIN)


def input_relevance(model, x: torch.Tensor, target: int, mode: str) -> torch.Tensor:
    """Reference relevance at a float input (a ViT's pixels): gradient x input of `mode`."""
    model.set_mode(mode)
    try:
        x = x.detach().clone().requires_grad_(True)
        model(x)[:, target].sum().backward()
        return (x * x.grad).detach()
    finally:
        model.set_mode(PLAIN)


def attention_maps(model, x, target=None, mode=PLAIN) -> tuple:
    """The attention probabilities of each block on input x (eager softmax), and with a
    target their gradients of that logit in the `mode` pass (PLAIN: the true gradient;
    ATTNLRP: the modified one, whose product with the map is its relevance)."""
    sdpa = [blk.sdpa for blk in model.blocks]
    for blk in model.blocks:
        blk.sdpa, blk.mode = False, mode
    if hasattr(model, "set_mode"):
        model.mode = mode
    try:
        with torch.set_grad_enabled(target is not None):
            out = model(x)
        probs = [blk.probs for blk in model.blocks]
        if target is None:
            return [p.detach().numpy().astype(np.float64) for p in probs], None
        grads = torch.autograd.grad(out[:, target].sum(), probs)
        return ([p.detach().numpy().astype(np.float64) for p in probs],
                [g.numpy().astype(np.float64) for g in grads])
    finally:
        for blk, s in zip(model.blocks, sdpa):
            blk.sdpa, blk.mode = s, PLAIN
        if hasattr(model, "set_mode"):
            model.mode = PLAIN


def hf_model(kind, path, attn, target=1):
    """A random-initialised transformers BERT classifier or GPT-2 LM (tiny configs, nothing
    downloaded) with `attn` attention, exported by TorchScript on a padded batch:
    (Explainer, feeds, seed, explained logit), the seed at `target` (BERT) or at the next
    token 5 of the last position (GPT-2)."""
    import transformers

    from onnxplain import Explainer

    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16, num_labels=3)
        model = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16)
        model = transformers.GPT2LMHeadModel(cfg)
    model.eval().set_attn_implementation(attn)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    ids = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # padding: with GPT-2's causal mask, whole rows of the attention are masked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits().eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"])
    ex = Explainer(str(path))
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    out = ex.predict(feeds)
    seed = np.zeros_like(out)
    if kind == "bert":
        seed[:, target] = 1
        logit = out[:, target]
    else:
        seed[:, -1, 5] = 1  # the next-token logit of token 5 at the last position
        logit = out[:, -1, 5]
    return ex, feeds, seed, logit
