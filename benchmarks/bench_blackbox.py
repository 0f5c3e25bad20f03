"""Black-box methods: occlusion and RISE throughput against plain onnxruntime inference of
the same perturbed inputs, and occlusion against Captum's `Occlusion`.

For each model (see models.py) and a batch of one image it times, on CPU:

- ``occlusion``: ``Explainer(path).attribute(x, method="occlusion", window=3,R/8,R/8,
  strides=S,S)`` end to end (the score of x, building every occluded copy, the model
  runs, the attribution), against
  - ``onnxruntime``: a plain onnxruntime session running the very same occluded copies
    (built beforehand, not timed), in chunks of the rows onnxplain itself runs at once;
    the ratio of forward rows per second is the method's efficiency (goal >= 0.9);
  - ``Captum``: ``Occlusion(model).attribute(x, sliding_window_shapes=..., strides=...,
    perturbations_per_eval=k)`` with k the same chunk size, weights frozen, the same
    thread count; the attributions are compared element-wise;
- ``rise``: ``attribute(x, method="rise", n_masks=M)`` against onnxruntime on the same
  M masked inputs.

Rows are forward passes of one input (occluded copies or masked inputs) per second.
Run alone: ``python benchmarks/bench_blackbox.py [--quick]`` (prints a markdown table).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

TITLE = "Black-box methods: throughput vs onnxruntime, occlusion vs Captum (CPU)"


def add_arguments(group) -> None:
    group.add_argument("--occlusion-stride", type=int, default=None,
                       help="occlusion stride in pixels (default R/8 full size, R/16 --quick; window R/8)")
    group.add_argument("--rise-masks", type=int, default=None, help="RISE masks (default 64 full size, 256 --quick)")


def _rows_per_run(ex, feeds, tensor) -> int:
    """The chunk size onnxplain's forward session runs (its memory budget / row bytes)."""
    return ex.forward_session(feeds, [tensor]).rows_per_run()


def _ort_rows(sess, name, rows, chunk):
    def run():
        out = []
        for s in range(0, len(rows), chunk):
            out.append(sess.run(None, {name: rows[s:s + chunk]})[0])
        return np.concatenate(out)

    return run


def bench_model(name, args, log):
    import torch
    from captum.attr import Occlusion

    from models import build
    from onnxplain import Explainer
    from run import fmt_ms, fmt_ratio, ort_session, time_call

    model, path, shape = build(name, args.width, args.resolution)
    ex = Explainer(path)
    sess = ort_session(path, args.threads)
    in_name = sess.get_inputs()[0].name
    r = shape[1]
    x = np.random.default_rng(0).normal(size=(1,) + tuple(shape)).astype(np.float32)
    target = 3
    win = (shape[0], max(1, r // 8), max(1, r // 8))
    stride = args.occlusion_stride or max(1, r // (16 if args.quick else 8))
    feeds = {ex.graph.inputs[0]: x}
    chunk = _rows_per_run(ex, feeds, ex.explained_tensor())
    timing = dict(repeats=args.repeats, warmup=args.warmup, budget=args.budget)
    rows, notes = [], []

    # --- occlusion
    counts = [int(np.ceil((d - w) / s)) + 1 for d, w, s in zip(shape[1:], win[1:], (stride, stride))]
    n_rows = counts[0] * counts[1]
    occluded = np.repeat(x, n_rows, axis=0)
    for i, (a, b) in enumerate(np.ndindex(*counts)):
        occluded[i, :, a * stride:a * stride + win[1], b * stride:b * stride + win[2]] = 0.0
    log(f"{name}: occlusion, {n_rows} rows, chunk {chunk}")
    ours = time_call(lambda: ex.attribute(x, method="occlusion", target=target, window=win,
                                          strides=(stride, stride)), **timing)
    ort = time_call(_ort_rows(sess, in_name, occluded, chunk), **timing)
    occ = Occlusion(model)
    xt = torch.tensor(x)

    def captum():
        with torch.inference_mode(False), torch.no_grad():
            return occ.attribute(xt, sliding_window_shapes=win, strides=(1, stride, stride), target=target,
                                 perturbations_per_eval=chunk).numpy()

    ref = time_call(captum, **timing)
    err = np.abs(ours.result - ref.result).max() / max(np.abs(ref.result).max(), 1e-30)
    rows.append([name, "occlusion", n_rows, fmt_ms(ours.median), f"{n_rows / ours.median:,.0f}",
                 f"{n_rows / ort.median:,.0f}", fmt_ratio(ort.median, ours.median), fmt_ms(ref.median),
                 fmt_ratio(ref.median, ours.median), f"{err:.1e}"])

    # --- RISE
    n_masks = args.rise_masks or (256 if args.quick else 64)
    log(f"{name}: rise, {n_masks} masks")
    ours = time_call(lambda: ex.attribute(x, method="rise", target=target, n_masks=n_masks, seed=0), **timing)
    from onnxplain.methods.rise import MaskSampler

    sampler = MaskSampler(x.shape, n_masks, 7, 0.5, np.random.default_rng(0))
    masked = (x * sampler.masks(np.arange(n_masks))[:, None]).astype(np.float32)
    ort = time_call(_ort_rows(sess, in_name, masked, chunk), **timing)
    rows.append([name, "rise", n_masks, fmt_ms(ours.median), f"{n_masks / ours.median:,.0f}",
                 f"{n_masks / ort.median:,.0f}", fmt_ratio(ort.median, ours.median), "—", "—", "—"])
    notes.append(f"{name}: {args.resolution}x{args.resolution}, width {args.width:g}; occlusion window "
                 f"{','.join(map(str, win))}, strides {stride},{stride}; {chunk} rows per run")
    return rows, notes


def main(args) -> str:
    from run import configure_threads, markdown_table

    configure_threads(args.threads)
    for k in ("occlusion_stride", "rise_masks"):
        if not hasattr(args, k):
            setattr(args, k, None)

    def log(msg):
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    rows, notes = [], []
    for name in args.models:
        try:
            r, n = bench_model(name, args, log)
        except Exception as exc:  # one model failing must not hide the others
            import traceback

            traceback.print_exc()
            r, n = [], [f"{name}: benchmark failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]
        rows += r
        notes += n
    header = ["model", "method", "rows", "onnxplain ms", "onnxplain rows/s", "onnxruntime rows/s",
              "onnxplain / onnxruntime throughput", "Captum ms", "Captum / onnxplain time", "max rel diff vs Captum"]
    return markdown_table(header, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


if __name__ == "__main__":
    from run import finish_args, make_parser

    parser = make_parser()
    add_arguments(parser.add_argument_group("bench_blackbox"))
    print(main(finish_args(parser.parse_args())))
