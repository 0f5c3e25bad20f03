"""onnxplain's gradient and integrated gradients against Captum, with onnxruntime's plain
inference of the same ONNX model as the floor.

For each model (VGG-16, ResNet-50; see models.py) and batch size it times, on CPU:

- ``inference``: onnxruntime running the exported model (the floor);
- ``torch fwd``: the torch model's forward pass under ``torch.inference_mode`` (context);
- ``gradient``: ``Explainer(path).attribute(x, method="gradient", target=t)`` end to end
  (the predicted-output forward pass it makes to build the seed included) against Captum
  ``Saliency(model).attribute(x, target=t, abs=False)``;
- ``gradient graph``: the compiled gradient explainer alone (``Explainer.export``, run
  in a plain onnxruntime session with a one-hot seed): the cost of the forward+backward
  graph without onnxplain's Python around it;
- ``integrated_gradients``: ``attribute(x, method="integrated_gradients", n_steps=50)``
  against Captum ``IntegratedGradients(model).attribute(x, target=t, n_steps=50,
  method="gausslegendre", internal_batch_size=k)``. By default ``k`` is the number of
  rows onnxplain itself runs at once under its default memory budget, so both run the
  same batches (``--ig-internal-batch`` overrides it).

Both peers get the same thread count (torch.set_num_threads = onnxruntime
intra_op_num_threads), torch is in eval mode with ``requires_grad_(False)`` weights,
warm-up calls are excluded and the median of several repeats is reported. Each gradient
is also checked against Captum's (max |onnxplain - captum| / max |captum|) so the
comparison is between the same computations.

Run alone: ``python benchmarks/bench_gradients.py [--quick] [--profile-top 15]``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

TITLE = "Gradients: onnxplain vs Captum (CPU)"
METHODS = ("gradient", "integrated_gradients")


def add_arguments(group) -> None:
    group.add_argument("--gradient-methods", type=lambda s: [v for v in s.split(",") if v],
                       default=list(METHODS), help="comma list: gradient, integrated_gradients (default both)")
    group.add_argument("--ig-steps", type=int, default=50, help="integration steps (default 50)")
    group.add_argument("--ig-internal-batch", type=int, default=None,
                       help="Captum internal_batch_size (default: the rows onnxplain runs at once, else n_steps)")
    group.add_argument("--target", type=int, default=3, help="class explained (default 3)")
    group.add_argument("--profile-top", type=int, default=0,
                       help="profile the gradient explainer with onnxruntime's profiler at the largest batch and "
                            "list this many most expensive node kinds (default 0: no profiling)")


# ----------------------------------------------------------------------------- helpers


def rel_err(a, b) -> tuple[float, float]:
    """(median, max) over the samples of max|a - b| / max|b| within each sample.

    Deep ReLU networks amplify float rounding: where torch and onnxruntime round a
    pre-activation near zero to opposite signs (BatchNorm folded by the exporter, other
    convolution algorithms), that ReLU gates the gradient differently and the whole
    sample's gradient differs by ~1e-2. The median shows the agreement of the
    computation; the max shows such flips."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    scale = np.maximum(np.abs(b).max(axis=1), 1e-30)
    per = np.abs(a - b).max(axis=1) / scale
    return float(np.median(per)), float(per.max())


def _fmt_err(e) -> str:
    if e is None:
        return "—"
    med, mx = e
    return f"{med:.0e}" if mx <= 10 * max(med, 1e-7) else f"{med:.0e} (max {mx:.0e})"


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def _brief(exc: BaseException) -> str:
    """A table-cell version of an error: the unsupported operators, or the error type."""
    names = getattr(exc, "operators", None) or getattr(exc, "ops", None)
    msg = str(exc)
    if names is None and "operator(s):" in msg:
        names = msg.split("operator(s):", 1)[1].split(";", 1)[0].strip()
    if names:
        return f"onnxplain: no rule for {names if isinstance(names, str) else ', '.join(names)}"
    return f"onnxplain failed: {type(exc).__name__}"


class Row:
    def __init__(self, model, batch, method):
        self.model, self.batch, self.method = model, batch, method
        self.ours = self.peer = self.floor = None
        self.n = []
        self.err = None
        self.note = ""


# ----------------------------------------------------------------------------- profiling


def profile_session(path: Path, feeds: dict, threads: int, runs: int = 3, level: str = "ALL") -> list[dict]:
    """Node events of `runs` timed runs (after one warm-up) of the model at `path`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    so.enable_profiling = True
    tmpdir = tempfile.mkdtemp(prefix="onnxplain_prof_", dir=str(HERE / "_work"))
    so.profile_file_prefix = os.path.join(tmpdir, "prof")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, feeds)
    prof = Path(sess.end_profiling())
    del sess
    events = json.loads(prof.read_text())
    prof.unlink(missing_ok=True)
    try:
        os.rmdir(tmpdir)
    except OSError:
        pass
    runs_ev = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[1:]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in runs_ev]
    nodes = []
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if windows and not any(a <= e["ts"] <= b for a, b in windows):
            continue
        nodes.append(e)
    for e in nodes:
        e["_runs"] = max(1, len(windows))
    return nodes


def summarize_profile(nodes: list[dict], top: int) -> str:
    if not nodes:
        return "(no node events recorded)"
    runs = nodes[0]["_runs"]
    by_kind: dict = {}
    by_node: dict = {}
    total = 0.0
    for e in nodes:
        name = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        phase = "backward" if name.startswith("onnxplain/") else "forward"
        us = e["dur"] / runs
        total += us
        by_kind[(phase, op)] = by_kind.get((phase, op), 0.0) + us
        shapes = e.get("args", {}).get("input_type_shape", [])
        shp = ", ".join("x".join(str(d) for d in list(s.values())[0]) for s in shapes if s)
        k = (phase, op, name)
        prev = by_node.get(k, (0.0, shp))
        by_node[k] = (prev[0] + us, shp)
    phase_tot = {}
    for (ph, _), us in by_kind.items():
        phase_tot[ph] = phase_tot.get(ph, 0.0) + us
    lines = [f"Sum of node kernel times per run: {total / 1e3:.1f} ms "
             + "(" + ", ".join(f"{ph} {us / 1e3:.1f} ms" for ph, us in sorted(phase_tot.items())) + ")", ""]
    rows = sorted(by_kind.items(), key=lambda kv: -kv[1])[:top]
    from run import markdown_table

    lines.append(markdown_table(["phase", "op", "ms/run", "share"],
                                [[ph, op, f"{us / 1e3:.2f}", f"{100 * us / total:.1f}%"] for (ph, op), us in rows]))
    lines.append("")
    rows = sorted(by_node.items(), key=lambda kv: -kv[1][0])[:top]
    lines.append(markdown_table(["phase", "op", "node", "ms/run", "input shapes"],
                                [[ph, op, f"`{nm[-60:]}`", f"{us / 1e3:.2f}", shp[:80]] for (ph, op, nm), (us, shp) in rows]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what-if rewrites
# Diagnostics only: rewrites of an exported explainer that show what a change to the rules
# would gain. onnxplain itself is not changed here.


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def stride1_convtranspose_as_conv(model):
    """Each ConvTranspose with stride 1, dilation 1, group 1 and a constant weight becomes a
    Conv with the weight transposed (in<->out channels) and flipped, pads k-1-p: the same
    values, but onnxruntime's CPU Conv gets the NCHWc layout and prepacked weights."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    done = 0
    for i, n in enumerate(m.graph.node):
        if n.op_type != "ConvTranspose" or n.input[1] not in inits or (len(n.input) > 2 and n.input[2]):
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        r = w.ndim - 2
        if _attr(n, "group", 1) != 1 or any(v != 1 for v in _attr(n, "strides", [1] * r)) \
                or any(v != 1 for v in _attr(n, "dilations", [1] * r)) \
                or _attr(n, "output_shape") is not None or any(_attr(n, "output_padding", [0] * r)) \
                or _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        k = list(w.shape[2:])
        pads = list(_attr(n, "pads", [0] * 2 * r))
        new_pads = [k[j % r] - 1 - p for j, p in enumerate(pads)]
        if min(new_pads) < 0:
            continue
        wf = np.ascontiguousarray(np.flip(w.swapaxes(0, 1), axis=tuple(range(2, 2 + r))))
        name = n.input[1] + "/as_conv"
        if name not in inits:
            t = numpy_helper.from_array(wf, name)
            m.graph.initializer.append(t)
            inits[name] = t
        m.graph.node[i].CopyFrom(helper.make_node("Conv", [n.input[0], name], list(n.output), name=n.name + "/as_conv",
                                                  kernel_shape=k, pads=new_pads))
        done += 1
    return m, done


def strided_convtranspose_as_conv(model, pointwise_only: bool = False):
    """Each strided ConvTranspose (group 1, dilation 1, constant weight, no output_shape) as
    onnxruntime's fast Conv: a 1x1 kernel mixes channels first (at the low resolution) and
    the result is spread onto every stride-th position with zeros between; a larger kernel
    convolves (stride 1, kernel transposed and flipped) the gradient spread out with zeros.
    The same sums as the ConvTranspose (the zeros add nothing), in another order."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    done = 0
    new_nodes = []

    def const(name, arr):
        if name not in inits:
            t = numpy_helper.from_array(np.asarray(arr), name)
            m.graph.initializer.append(t)
            inits[name] = t
        return name

    for n in m.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "ConvTranspose" and len(n.input) > 1 else None
        if w is None or (len(n.input) > 2 and n.input[2]):
            new_nodes.append(n)
            continue
        w = numpy_helper.to_array(w)
        r = w.ndim - 2
        s = list(_attr(n, "strides", [1] * r))
        if r != 2 or _attr(n, "group", 1) != 1 or all(v == 1 for v in s) \
                or any(v != 1 for v in _attr(n, "dilations", [1] * r)) or _attr(n, "output_shape") is not None \
                or _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or (pointwise_only and w.shape[2:] != (1, 1)):
            new_nodes.append(n)
            continue
        k = list(w.shape[2:])
        pads = list(_attr(n, "pads", [0] * 2 * r))
        op = list(_attr(n, "output_padding", [0] * r))
        tag = n.name + "/as_conv"
        wc = np.ascontiguousarray(np.flip(w.swapaxes(0, 1), axis=(2, 3)))
        wname = const(n.input[1] + "/as_conv", wc)
        src = n.input[0]
        nodes = []
        if k == [1, 1]:  # channels first, at the low resolution
            nodes.append(helper.make_node("Conv", [src, wname], [tag + "/mixed"], name=tag + "/conv", kernel_shape=k))
            src = tag + "/mixed"
        # Spread out: (N, C, H, W) -> (N, C, H, s, W, s) zero-padded -> (N, C, sH, sW), cropped to s(H-1)+1.
        nodes += [
            helper.make_node("Unsqueeze", [src, const(tag + "/ax", np.array([3, 5], np.int64))], [tag + "/u"], name=tag + "/u"),
            helper.make_node("Pad", [tag + "/u", const(tag + "/p", np.array([0] * 6 + [0, 0, 0, s[0] - 1, 0, s[1] - 1], np.int64))],
                             [tag + "/z"], name=tag + "/z"),
            helper.make_node("Shape", [src], [tag + "/shape"], name=tag + "/shape"),
            helper.make_node("Mul", [tag + "/shape", const(tag + "/sc", np.array([1, 1] + s, np.int64))], [tag + "/shape2"],
                             name=tag + "/shape2"),
            helper.make_node("Reshape", [tag + "/z", tag + "/shape2"], [tag + "/spread"], name=tag + "/spread"),
            helper.make_node("Slice", [tag + "/spread", const(tag + "/b0", np.array([0, 0], np.int64)),
                                       const(tag + "/e0", np.array([1 - s[0], 1 - s[1]], np.int64)),
                                       const(tag + "/a0", np.array([2, 3], np.int64))], [tag + "/dil"], name=tag + "/dil"),
        ]
        if k == [1, 1]:
            # Output s(H-1)+1 - pads + output_padding: crop the pads, append the output padding.
            nodes.append(helper.make_node("Pad", [tag + "/dil", const(tag + "/p2", np.array(
                [0, 0, -pads[0], -pads[1], 0, 0, op[0] - pads[2], op[1] - pads[3]], np.int64))], [n.output[0]], name=tag + "/out"))
        else:
            before = [k[j] - 1 - pads[j] for j in range(2)]
            after = [k[j] - 1 - pads[2 + j] + op[j] for j in range(2)]
            nodes += [helper.make_node("Pad", [tag + "/dil", const(tag + "/p2", np.array([0, 0] + before + [0, 0] + after, np.int64))],
                                       [tag + "/padded"], name=tag + "/pad"),
                      helper.make_node("Conv", [tag + "/padded", wname], [n.output[0]], name=tag + "/conv", kernel_shape=k)]
        new_nodes += nodes
        done += 1
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    return m, done


def reuse_forward_maxpool_indices(model):
    """A backward MaxPool that recomputes a forward MaxPool (same input, same attributes)
    only to get its Indices: take them from the forward node instead."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    fwd = {}
    for n in m.graph.node:
        if n.op_type == "MaxPool" and not n.name.startswith("onnxplain/"):
            fwd[n.input[0]] = n
    drop, rename = [], {}
    for n in m.graph.node:
        if n.op_type != "MaxPool" or not n.name.startswith("onnxplain/") or len(n.output) < 2:
            continue
        f = fwd.get(n.input[0])
        if f is None:
            continue
        same = {a.name: a for a in f.attribute if a.name != "storage_order"}
        mine = {a.name: a for a in n.attribute if a.name != "storage_order"}
        if same != mine:
            continue
        if len(f.output) < 2:
            f.output.append(f.output[0] + "/indices")
        rename[n.output[1]] = f.output[1]
        drop.append(n)
    for n in drop:
        m.graph.node.remove(n)
    for n in m.graph.node:
        for j, v in enumerate(n.input):
            if v in rename:
                n.input[j] = rename[v]
    return m, len(drop)


def what_if(gpath: Path, feeds: dict, threads: int, tc: dict, ref_out: str) -> str:
    import gc

    import onnx

    from run import ort_session, time_call

    base = onnx.load(str(gpath))
    a, n_conv = stride1_convtranspose_as_conv(base)
    b, n_pool = reuse_forward_maxpool_indices(base)
    c, _ = reuse_forward_maxpool_indices(a)
    ref = None
    lines = []
    for label, mdl, count in (("as exported", base, None),
                              ("stride-1 ConvTranspose -> Conv", a, n_conv),
                              ("MaxPool indices from the forward pass", b, n_pool),
                              ("both", c, None)):
        if count == 0:
            lines.append(f"- {label}: nothing to rewrite")
            continue
        sess = ort_session(mdl.SerializeToString(), threads)
        t = time_call(lambda: sess.run([ref_out], feeds), **tc)
        out = t.result[0]
        del sess
        gc.collect()
        ref = out if ref is None else ref
        diff = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
        what = f" ({count} nodes)" if count else ""
        lines.append(f"- {label}{what}: {t.median * 1e3:.1f} ms (n={t.n}; rel. diff to as-exported {diff:.0e})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the benchmark


def bench_model(name: str, args, log) -> tuple[list[Row], list[str]]:
    import torch
    from captum.attr import IntegratedGradients, Saliency

    import models
    from onnxplain import Explainer
    from run import ort_session, time_call

    notes: list[str] = []
    model, path, shape = models.build(name, args.width, args.resolution)
    model.eval()
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())
    T = args.threads
    tc = dict(repeats=args.repeats, warmup=args.warmup, budget=args.budget)
    target = args.target
    methods = args.gradient_methods
    disp = models.DISPLAY.get(name, name)

    infer = ort_session(Path(path), T)
    in_name = infer.get_inputs()[0].name
    explainer = Explainer(str(path), providers=["CPUExecutionProvider"])

    # The compiled gradient explainer on its own, exported once (dynamic batch).
    gpath = Path(path).with_suffix(".gradient.onnx")
    gsess = gspec = None
    unsupported = None
    if "gradient" in methods:
        try:
            gspec = explainer.export(gpath, method="gradient")
            gsess = ort_session(gpath, T)
        except Exception as exc:  # onnxplain lacks a rule: report it, time the peers anyway
            unsupported = _short_error(exc)
            notes.append(f"{disp}: onnxplain cannot compile the gradient: {unsupported}")

    rows: list[Row] = []
    rng = np.random.default_rng(0)
    for B in args.batch:
        x = rng.standard_normal((B,) + tuple(shape)).astype(np.float32)
        xt = torch.from_numpy(x.copy())
        log(f"[{name} b={B}] inference")
        floor = time_call(lambda: infer.run(None, {in_name: x}), **tc)
        with torch.inference_mode():
            tfwd = time_call(lambda: model(xt), **tc)
        seed = np.zeros((B, models.NUM_CLASSES), np.float32)
        seed[:, target] = 1.0

        for method in methods:
            r = Row(disp, B, method)
            r.floor = floor.median
            r.torch_fwd = tfwd.median
            ours = peer = None
            # --- onnxplain, end to end
            log(f"[{name} b={B}] {method}: onnxplain")
            kw = {"n_steps": args.ig_steps} if method == "integrated_gradients" else {}
            try:
                ours = time_call(lambda: explainer.attribute(x, method=method, target=target, **kw), **tc)
                r.ours = ours.median
            except Exception as exc:
                r.note = _brief(exc)
                if r.note != _short_error(exc) and not any(_short_error(exc)[:40] in n for n in notes):
                    notes.append(f"{disp}: {_short_error(exc)}")
            # --- Captum
            log(f"[{name} b={B}] {method}: captum")
            if method == "gradient":
                sal = Saliency(model)
                peer = time_call(lambda: sal.attribute(xt, target=target, abs=False), **tc)
            else:
                k = args.ig_internal_batch
                if k is None:
                    k = _onnxplain_rows(explainer) or args.ig_steps
                ig = IntegratedGradients(model)
                peer = time_call(lambda: ig.attribute(xt, target=target, n_steps=args.ig_steps,
                                                      method="gausslegendre", internal_batch_size=k), **tc)
                r.note = (r.note + "; " if r.note else "") + f"Captum internal_batch_size={k}"
            r.peer = peer.median
            r.n = [floor.n, peer.n] + ([ours.n] if ours else [])
            if ours is not None:
                r.err = rel_err(ours.result, peer.result.detach().numpy())
            rows.append(r)

            # --- the compiled gradient graph alone
            if method == "gradient" and gsess is not None:
                log(f"[{name} b={B}] gradient graph")
                out_name = next(iter(gspec.attributions.values()))
                feeds = {in_name: x, gspec.seed: seed}
                g = time_call(lambda: gsess.run([out_name], feeds), **tc)
                rg = Row(disp, B, "gradient graph")
                rg.floor, rg.torch_fwd = floor.median, tfwd.median
                rg.ours, rg.peer = g.median, peer.median
                rg.n = [floor.n, peer.n, g.n]
                rg.err = rel_err(g.result[0], peer.result.detach().numpy())
                rg.note = "explainer graph run directly in onnxruntime"
                rows.append(rg)

    if args.profile_top and gsess is not None:
        # Free the timed sessions' arenas first: full-size VGG-16 at batch 16 needs several GB per session.
        import gc

        del gsess, infer, explainer
        gc.collect()
        B = max(args.batch)
        log(f"[{name} b={B}] profiling the gradient explainer")
        x = rng.standard_normal((B,) + tuple(shape)).astype(np.float32)
        seed = np.zeros((B, models.NUM_CLASSES), np.float32)
        seed[:, target] = 1.0
        feeds = {in_name: x, gspec.seed: seed}
        notes.append(f"### Profile: {disp} gradient explainer, batch {B}\n\n"
                     + summarize_profile(profile_session(gpath, feeds, T), args.profile_top))
        levels = []
        for level in ("BASIC", "EXTENDED", "ALL"):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = T
            so.log_severity_level = 3
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
            s = ort.InferenceSession(str(gpath), so, providers=["CPUExecutionProvider"])
            levels.append(f"{level} {time_call(lambda: s.run(None, feeds), **tc).median * 1e3:.1f} ms")
            del s
            gc.collect()
        notes.append(f"{disp} gradient graph, batch {B}, by graph optimisation level: " + ", ".join(levels))
        out_name = next(iter(gspec.attributions.values()))
        notes.append(f"{disp} gradient graph, batch {B}, what-if rewrites of the exported explainer "
                     "(diagnostics; onnxplain unchanged):\n\n" + what_if(gpath, feeds, T, tc, out_name))
    return rows, notes


def _onnxplain_rows(explainer) -> int | None:
    """Rows per onnxruntime run onnxplain chose for its gradient explainer (memory budget)."""
    from onnxplain.runtime import Session

    for v in explainer._cache.values():
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], Session):
            return int(v[1].rows_per_run())
    return None


def render(rows: list[Row], notes: list[str], args) -> str:
    from run import fmt_ms, fmt_ratio, markdown_table

    header = ["model", "batch", "method", "onnxplain ms", "Captum ms", "inference ms", "onnxplain/Captum",
              "onnxplain/inference", "Captum/inference", "rel err vs Captum", "notes"]
    body = []
    for r in rows:
        body.append([
            r.model, r.batch, r.method, fmt_ms(r.ours), fmt_ms(r.peer), fmt_ms(r.floor),
            fmt_ratio(r.ours, r.peer), fmt_ratio(r.ours, r.floor), fmt_ratio(r.peer, r.floor),
            _fmt_err(r.err), r.note or "",
        ])
    text = [
        f"Models: {', '.join(args.models)} at width {args.width:g}, input 3x{args.resolution}x{args.resolution}, "
        f"1000 classes, target class {args.target}; integrated gradients with n_steps={args.ig_steps} "
        "(Gauss-Legendre, baseline 0) in both libraries. Times are medians in milliseconds of one call "
        "for the whole batch; `inference` is onnxruntime's plain run of the same ONNX model and batch. "
        "`gradient` is onnxplain's `attribute()` end to end (it runs the model once more to build the "
        "seed); `gradient graph` is the compiled explainer alone. `rel err vs Captum` is, per sample, "
        "max|onnxplain - Captum| / max|Captum|: the median over the batch, and the maximum where it "
        "is larger (a sample where torch and onnxruntime round one ReLU pre-activation near zero "
        "to opposite signs gets a gradient ~1e-2 apart; that is float rounding, not a rule error).",
        "",
        markdown_table(header, body),
        "",
        "torch forward (inference_mode) for reference: "
        + ", ".join(sorted({f"{r.model} b={r.batch}: {fmt_ms(r.torch_fwd)} ms" for r in rows
                            if getattr(r, 'torch_fwd', None) is not None})),
    ]
    for n in notes:
        text += ["", n]
    return "\n".join(text)


def main(args) -> str:
    from run import configure_threads

    configure_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
    for k, v in (("gradient_methods", list(METHODS)), ("ig_steps", 50), ("ig_internal_batch", None),
                 ("target", 3), ("profile_top", 0)):
        if not hasattr(args, k):
            setattr(args, k, v)

    def log(msg):
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    rows, notes = [], []
    for name in args.models:
        try:
            r, n = bench_model(name, args, log)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            r, n = [], [f"{name}: benchmark failed: {_short_error(exc)}"]
        rows += r
        notes += n
    return render(rows, notes, args)


if __name__ == "__main__":
    from run import finish_args, make_parser

    parser = make_parser()
    add_arguments(parser.add_argument_group("bench_gradients"))
    a = finish_args(parser.parse_args())
    out = main(a)
    print(out)
    if not a.no_write:
        from run import machine_info, update_results

        update_results(a.out, {"machine": "## Machine\n\n" + machine_info(a), "gradients": f"## {TITLE}\n\n{out}"})
        print(f"wrote {a.out}")
