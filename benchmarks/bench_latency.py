"""Single-explanation latency on the CPU against issue 15's goals, measured for a shared machine.

Goals (batch 1): gradient <= 2.2x one onnxruntime inference of the same model; LRP <= 0.5x
Zennit; integrated gradients (50 Gauss-Legendre steps) <= 0.8x Captum.

On a machine that many people share, one process gets a fraction of a core that changes
from second to second, so medians of separate blocks of repeats compare different loads.
Here every round times each candidate once, in turn, and each ratio is formed within a round
(ours / reference of the same round); the table gives the median of those ratios and their
range, with each candidate's median wall time (range) and median CPU time of the process
(`time.process_time`, all threads: onnxruntime's spinning threads count there).

Candidates are warmed (sessions compiled, arenas grown) before the first round. IG runs the
host path and, with `--resident`, the device-resident path (onnxplain/resident.py, forced on
the CPU by ONNXPLAIN_RESIDENT=1) in the same rounds. `--spin 0` adds onnxplain sessions made
with ONNXPLAIN_SPIN=0 (onnxruntime's intra-op threads sleep instead of spinning).

Run: ``python benchmarks/bench_latency.py --goals gradient,lrp,ig --rounds 7``
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

TITLE = "Single-explanation latency vs issue 15's goals (CPU)"
GOALS = {"gradient": 2.2, "lrp": 0.5, "ig": 0.8}
LRP = ("lrp.epsilon", "lrp.epsilon_plus", "lrp.epsilon_plus_flat")


def add_arguments(group) -> None:
    group.add_argument("--goals", type=lambda s: [v for v in s.split(",") if v], default=list(GOALS))
    group.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    group.add_argument("--lrp-composites", type=lambda s: [v for v in s.split(",") if v], default=list(LRP))
    group.add_argument("--ig-models", type=lambda s: [v for v in s.split(",") if v], default=["resnet50"])
    group.add_argument("--resident", action="store_true", help="also time IG's device-resident path")
    group.add_argument("--spin", default=None, help="'0': also time onnxplain sessions made with ONNXPLAIN_SPIN=0")
    group.add_argument("--blocks", action="store_true",
                       help="time each candidate in a block of --rounds calls instead of interleaved rounds")


def _with_env(env: dict, make):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return make()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Candidate:
    def __init__(self, label, fn, env=None):
        self.label, self.fn, self.env = label, fn, env or {}
        self.wall, self.cpu = [], []

    def call(self):
        return _with_env(self.env, self.fn)

    def time_once(self):
        c, t = time.process_time(), time.perf_counter()
        self.call()
        self.wall.append(time.perf_counter() - t)
        self.cpu.append(time.process_time() - c)


BLOCKS = False  # --blocks: each candidate timed in a block of its own (see interleave)


def interleave(cands: list, rounds: int, log, title: str) -> None:
    """Every round times each candidate once, in turn. With --blocks each candidate is warmed
    and timed `rounds` times in a row instead: one session busy at a time, as a user calls
    one; sessions timed in turn disturb each other's intra-op thread pools (a pool that spins
    after its run takes the core the next one needs), which interleaving at 2+ threads shows
    as a floor that does not gain from its second thread."""
    if BLOCKS:
        for c in cands:
            c.call()
            c.call()
            for _ in range(rounds):
                c.time_once()
            log(f"  {title} block {c.label}: " + ", ".join(f"{v * 1e3:.0f}" for v in c.wall))
        for c in cands:
            c.fn = None
        import gc

        gc.collect()
        return
    for c in cands:
        c.call()  # warm-up: compiles sessions, grows arenas
        c.call()
    for r in range(rounds):
        for c in cands:
            c.time_once()
        log(f"  {title} round {r + 1}/{rounds}: " + ", ".join(f"{c.label} {c.wall[-1] * 1e3:.0f}" for c in cands))
    for c in cands:
        c.fn = None  # the timings stay; sessions and models go (full-size VGG-16 holds GBs)
    import gc

    gc.collect()


def _spread(vals) -> str:
    return f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"


def _ms(c) -> str:
    w = [v * 1e3 for v in c.wall]
    return f"{statistics.median(w):,.0f} ({min(w):,.0f}-{max(w):,.0f})"


def _ort(path, threads):
    from run import ort_session

    s = ort_session(Path(path), threads)
    name = s.get_inputs()[0].name
    return s, name


def bench_gradient(name, args, log):
    import models
    from onnxplain import Explainer

    _, path, shape = models.build(name, args.width, args.resolution)
    x = np.random.default_rng(0).standard_normal((1,) + tuple(shape)).astype(np.float32)
    sess, in_name = _ort(path, args.threads)
    floor = Candidate("inference", lambda: sess.run(None, {in_name: x}))
    ex = Explainer(str(path), providers=["CPUExecutionProvider"])
    cands = [floor, Candidate("gradient", lambda: ex.attribute(x, method="gradient", target=3))]
    if args.spin == "0":
        ex0 = _with_env({"ONNXPLAIN_SPIN": "0"}, lambda: Explainer(str(path), providers=["CPUExecutionProvider"]))
        cands.append(Candidate("gradient, ONNXPLAIN_SPIN=0", lambda: ex0.attribute(x, method="gradient", target=3),
                               {"ONNXPLAIN_SPIN": "0"}))
    interleave(cands, args.rounds, log, f"{name} gradient")
    return [(name, "gradient", c, floor, "inference") for c in cands[1:]], cands


def bench_lrp(name, args, log):
    import torch

    import models
    import zennit_ref as zr
    from onnxplain import Explainer

    model, path, shape = models.build(name, args.width, args.resolution)
    model.eval()
    model.requires_grad_(False)
    x = np.random.default_rng(0).standard_normal((1,) + tuple(shape)).astype(np.float32)
    ex = Explainer(str(path), providers=["CPUExecutionProvider"])
    target = int(ex.predict(x).argmax(1)[0])
    seed = np.zeros((1, models.NUM_CLASSES), np.float32)
    seed[0, target] = 1
    rows, all_c = [], []
    for comp in args.lrp_composites:
        attributor = zr.Gradient(model=model, composite=zr.zennit_composite(comp))
        xt, st = torch.tensor(x), torch.tensor(seed)
        with attributor:
            zen = Candidate(f"Zennit {comp}", lambda: attributor(xt.requires_grad_(True), st)[1])
            ours = Candidate(comp, lambda c=comp: ex.attribute(x, method=c, target=target))
            interleave([zen, ours], args.rounds, log, f"{name} {comp}")
        rows.append((name, comp, ours, zen, "Zennit"))
        all_c += [zen, ours]
    return rows, all_c


def bench_ig(name, args, log):
    from captum.attr import IntegratedGradients

    import models
    import torch
    from onnxplain import Explainer

    model, path, shape = models.build(name, args.width, args.resolution)
    model.eval()
    model.requires_grad_(False)
    x = np.random.default_rng(0).standard_normal((1,) + tuple(shape)).astype(np.float32)
    xt = torch.from_numpy(x.copy())
    ex = Explainer(str(path), providers=["CPUExecutionProvider"])
    ex.attribute(x, method="integrated_gradients", target=3, n_steps=50)
    from onnxplain.runtime import Session

    k = next(int(v[1].rows_per_run()) for v in ex._cache.values()
             if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], Session))
    ig = IntegratedGradients(model)
    cap = Candidate(f"Captum IG (internal_batch_size={k})",
                    lambda: ig.attribute(xt, target=3, n_steps=50, method="gausslegendre", internal_batch_size=k))
    host = Candidate("IG host", lambda: ex.attribute(x, method="integrated_gradients", target=3, n_steps=50),
                     {"ONNXPLAIN_RESIDENT": "0"})
    cands = [cap, host]
    if args.resident:
        cands.append(Candidate("IG resident", lambda: ex.attribute(x, method="integrated_gradients", target=3,
                                                                    n_steps=50), {"ONNXPLAIN_RESIDENT": "1"}))
    interleave(cands, args.rounds, log, f"{name} IG")
    rows = [(name, "integrated_gradients", c, cap, "Captum") for c in cands[1:]]
    if args.resident:
        rows.append((name, "IG resident vs host", cands[2], host, "IG host"))
    return rows, cands


def render(rows, args) -> str:
    from run import markdown_table

    body = []
    for model, what, ours, ref, ref_name in rows:
        ratios = [a / b for a, b in zip(ours.wall, ref.wall)]
        cpu = statistics.median(ours.cpu) / statistics.median(ref.cpu)
        key = "gradient" if what == "gradient" else "lrp" if what.startswith("lrp") else "ig"
        goal = GOALS[key] if ref_name in ("inference", "Zennit", "Captum") else None
        med = statistics.median(ratios)
        verdict = "" if goal is None else ("met" if max(ratios) <= goal else "met (median)" if med <= goal
                                           else "not met")
        body.append([model, ours.label, f"{ref_name}", _ms(ours), _ms(ref), _spread(ratios), f"{cpu:.2f}",
                     "" if goal is None else f"<= {goal}", verdict])
    return markdown_table(["model", "onnxplain", "reference", "onnxplain ms (range)", "reference ms (range)",
                           "ratio per round: median (range)", "CPU-time ratio", "goal", "verdict"], body)


def main(args) -> str:
    from run import configure_threads

    configure_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
    for k, v in (("goals", list(GOALS)), ("rounds", 5), ("lrp_composites", list(LRP)), ("ig_models", ["resnet50"]),
                 ("resident", False), ("spin", None), ("blocks", False)):
        if not hasattr(args, k):
            setattr(args, k, v)
    global BLOCKS
    BLOCKS = bool(args.blocks)

    def log(msg):
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    rows = []
    t0 = time.time()
    if "gradient" in args.goals:
        for name in args.models:
            rows += bench_gradient(name, args, log)[0]
    if "lrp" in args.goals:
        rows += bench_lrp("vgg16", args, log)[0]
    if "ig" in args.goals:
        for name in args.ig_models:
            rows += bench_ig(name, args, log)[0]
    return (f"Batch 1, width {args.width:g}, {args.resolution}x{args.resolution}, {args.threads} threads, "
            f"{args.rounds} " + ("calls in a block per candidate" if args.blocks else "interleaved rounds") + " after 2 warm-up calls each; wall ms as median (min-max).\n\n"
            + render(rows, args) + f"\n\n_(section took {time.time() - t0:.0f} s)_")


if __name__ == "__main__":
    from run import finish_args, make_parser

    parser = make_parser()
    add_arguments(parser.add_argument_group("bench_latency"))
    a = finish_args(parser.parse_args())
    print(main(a))
