"""onnxplain's LRP composites against Zennit's, with onnxruntime inference as the floor.

For VGG-16 and ResNet-50 (plain torch, see models.py) at batch 1 and 16 it times, on CPU:

- ``inference``: onnxruntime running the exported model (the floor);
- each composite: ``Explainer(path).attribute(x, method=name, target=t)`` end to end
  (including the forward pass that finds the predicted class) against Zennit's composite of
  the same name used as a careful user would: weights frozen, hooks registered once
  (``with Gradient(model, composite)``), only the attribution call timed.

Both get the same thread count; warm-up calls are excluded and the median of repeats is
reported, with onnxplain/Zennit and onnxplain/inference ratios. For VGG-16 (no residual
sums, which Zennit handles only through its torchvision canonizer) the results are also
compared (max |onnxplain - zennit| / max |zennit|).

Run: ``python benchmarks/bench_lrp.py [--quick] [--threads N] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent), str(HERE.parent / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
import zennit_ref as zr  # noqa: E402  (Zennit importable without torchvision)
from onnxplain.explainer import Explainer  # noqa: E402

COMPOSITES = ["lrp.epsilon", "lrp.epsilon_plus", "lrp.epsilon_plus_flat", "lrp.epsilon_gamma_box",
              "lrp.epsilon_alpha2_beta1", "lrp.epsilon_alpha2_beta1_flat"]
BOX = dict(low=-3.0, high=3.0)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _zennit_call(model, name, x, seed):
    kw = {}
    if name == "lrp.epsilon_gamma_box":
        kw = dict(low=torch.full((1,) + tuple(x.shape[1:]), BOX["low"]),
                  high=torch.full((1,) + tuple(x.shape[1:]), BOX["high"]))
    composite = zr.zennit_composite(name, **kw)
    attributor = zr.Gradient(model=model, composite=composite)
    xt, st = torch.tensor(x), torch.tensor(seed)

    def run():
        return attributor(xt.requires_grad_(True), st)[1]

    return attributor, run


def bench(name, width, resolution, batches, repeats, log):
    model, path, shape = models.build(name, width, resolution)
    ex = Explainer(str(path), providers=["CPUExecutionProvider"])
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch,) + tuple(shape)).astype(np.float32)
        floor = median_time(lambda: sess.run(None, {in_name: x}), repeats)
        rows.append((name, batch, "inference", floor, None, None))
        logits = sess.run(None, {in_name: x})[0]
        target = logits.argmax(1)
        seed = np.eye(logits.shape[1], dtype=np.float32)[target]
        for comp in COMPOSITES:
            kw = BOX if comp == "lrp.epsilon_gamma_box" else {}
            ours_t = median_time(lambda: ex.attribute(x, method=comp, target=target, **kw), repeats)
            attributor, run = _zennit_call(model, comp, x, seed)
            with attributor:
                theirs_t = median_time(run, repeats)
                err = None
                if name.startswith("vgg"):
                    ref = run().detach().numpy()
                    ours = ex.attribute(x, method=comp, target=target, **kw)
                    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
            rows.append((name, batch, comp, ours_t, theirs_t, err))
            log(f"  {name} b{batch} {comp}: onnxplain {ours_t * 1e3:.0f} ms, zennit {theirs_t * 1e3:.0f} ms")
    return rows


def render(rows) -> str:
    floors = {(r[0], r[1]): r[3] for r in rows if r[2] == "inference"}
    out = ["| model | batch | method | onnxplain ms | Zennit ms | onnxplain / Zennit | onnxplain / inference "
           "| max rel. diff |", "|---|---|---|---|---|---|---|---|"]
    for name, batch, what, ours, theirs, err in rows:
        floor = floors[(name, batch)]
        if what == "inference":
            out.append(f"| {name} | {batch} | onnxruntime inference | {ours * 1e3:.1f} | | | 1.00 | |")
            continue
        out.append(f"| {name} | {batch} | {what} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {ours / theirs:.2f} "
                   f"| {ours / floor:.2f} | {'' if err is None else f'{err:.1e}'} |")
    return "\n".join(out)


TITLE = "LRP composites: onnxplain vs Zennit (CPU)"


def main(args=None) -> str:
    """From run.py: `args` is its parsed namespace (models, width, resolution, batch, repeats,
    threads). On its own: parse `args` as the command line."""
    if not isinstance(args, argparse.Namespace):
        p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        p.add_argument("--quick", action="store_true", help="narrow 128x128 models, batch 1 and 4")
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--repeats", type=int, default=3)
        args = p.parse_args(args)
        width, res, batches = (0.25, 128, (1, 4)) if args.quick else (1.0, 224, (1, 16))
        names = ("vgg16", "resnet50")
    else:
        width, res, batches = args.width, args.resolution, tuple(args.batch)
        names = tuple(n for n in args.models if n in ("vgg16", "resnet50"))
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    rows = []
    for name in names:
        rows += bench(name, width, res, batches, args.repeats, log)
    table = render(rows)
    return (f"VGG-16 and ResNet-50 at width {width:g}, {res}x{res}, {args.threads} threads; "
            "medians of repeats in ms per call for the whole batch. `max rel. diff` compares with "
            "Zennit where its canonizers apply to the model (VGG).\n\n" + table)


if __name__ == "__main__":
    print(main())
