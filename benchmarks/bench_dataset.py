"""Dataset throughput (inputs/s): the local dataset engine against a plain loop over
`Explainer.attribute`, and the Ray engine with 1 and 2 workers.

64 photos (crops and flips of the bundled cat photo, JPEG, decoded and preprocessed every
run) through models/efficientnet_lite0.onnx, for gradient and occlusion (window 56,
stride 56), at batch 1 and 16:

- ``loop``: the peer script: for each batch, ``load_inputs`` + ``attribute`` +
  ``numpy.save`` of the batch's attributions, one after the other;
- ``engine``: ``engine.explain_dataset`` (decode threads ahead of onnxruntime, shards and
  index written, run keys hashed), with the index's predicted class and score (one forward
  pass a batch more than the loop) and without them (``scores=False``: the same passes);
- ``ray N``: ``engine_ray.explain_dataset_ray`` with N actors of one onnxruntime thread on
  a local cluster already started (actor start-up included: it is part of every run),
  against the local engine with one onnxruntime thread (``engine 1t``).

Sessions are compiled before the clock starts (one warm-up batch) for the loop and the
local engine; the Ray actors compile their own inside the timed run. The loop and the
engine alternate, best of --repeat runs each (the machine is shared).
Run alone: ``python benchmarks/bench_dataset.py [--quick] [--no-ray]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
PHOTO = ROOT / "models" / "chelsea.png"
METHODS = {"gradient": {}, "occlusion": {"window": "3,56,56", "strides": "3,56,56"}}


def make_photos(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = Image.open(PHOTO).convert("RGB")
    w, h = base.size
    out = []
    for i in range(n):
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = base.crop((x, y, x + cw, y + ch))
        if i % 2:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        p = folder / f"photo{i:03d}.jpg"
        img.save(p, quality=90)
        out.append(p)
    return out


def time_loop(e, paths, method, opts, batch, out: Path) -> float:
    from onnxplain.datasets import preprocess_for
    from onnxplain.io import load_inputs

    pre = preprocess_for(e)
    shape = list(e.inputs.values())[0]
    out.mkdir(parents=True, exist_ok=True)
    warm = load_inputs(paths[:batch], pre, shape)
    e.attribute(warm.batch, method=method, **opts)
    t = time.perf_counter()
    for i in range(0, len(paths), batch):
        x = load_inputs(paths[i:i + batch], pre, shape)
        a = e.attribute(x.batch, method=method, **opts)
        np.save(out / f"batch{i}.npy", a)
    return time.perf_counter() - t


def time_engine(e, folder, paths, method, opts, batch, out: Path, scores: bool = True) -> float:
    from onnxplain.datasets import preprocess_for
    from onnxplain.engine import explain_dataset
    from onnxplain.io import load_inputs

    warm = load_inputs(paths[:batch], preprocess_for(e), list(e.inputs.values())[0])
    e.attribute(warm.batch, method=method, **opts)
    t = time.perf_counter()
    s = explain_dataset(MODEL, folder, out, method=method, options=opts, batch_size=batch, explainer=e, quiet=True,
                        scores=scores)
    assert s.explained == len(paths), s
    return time.perf_counter() - t


def time_ray(folder, n, method, opts, batch, workers, out: Path) -> float:
    from onnxplain.engine_ray import explain_dataset_ray

    t = time.perf_counter()
    s = explain_dataset_ray(MODEL, folder, out, method=method, options=opts, batch_size=batch, workers=workers,
                            threads=1, quiet=True)
    assert s.explained == n, s
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 photos, not 64")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs (default 2)")
    args = ap.parse_args(argv)
    from onnxplain import runtime
    from onnxplain.explainer import Explainer

    runtime.QUIET = True
    n = 16 if args.quick else 64
    tmp = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    try:
        folder = tmp / "photos"
        folder.mkdir()
        paths = make_photos(folder, n)
        rows = []
        e = Explainer(MODEL)
        for method, opts in METHODS.items():
            for batch in (1, 16):
                loop, eng, bare = [], [], []
                for _ in range(args.repeat):
                    loop.append(time_loop(e, paths, method, opts, batch, tmp / "loop"))
                    eng.append(time_engine(e, folder, paths, method, opts, batch, tmp / f"eng_{method}_{batch}"))
                    bare.append(time_engine(e, folder, paths, method, opts, batch, tmp / f"bare_{method}_{batch}",
                                            scores=False))
                loop, eng, bare = n / min(loop), n / min(eng), n / min(bare)
                rows.append((method, batch, loop, eng, bare))
                print(f"{method} batch {batch}: loop {loop:.2f}/s, engine {eng:.2f}/s, no scores {bare:.2f}/s",
                      file=sys.stderr)
        lines = [f"{n} photos, models/efficientnet_lite0.onnx, {os.cpu_count()} CPU threads visible, "
                 f"best of {args.repeat}.", "",
                 "| method | batch | loop | engine (with scores) | engine / loop | engine, no scores | "
                 "no scores / loop |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {m} | {b} | {lo:.2f} | {en:.2f} | {en / lo:.2f} | {ns:.2f} | {ns / lo:.2f} |"
                  for m, b, lo, en, ns in rows]
        if not args.no_ray:
            import ray

            os.environ["ONNXPLAIN_THREADS"] = "1"
            e1 = Explainer(MODEL)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            ray_rows = []
            try:
                for method, opts in METHODS.items():
                    one = time_engine(e1, folder, paths, method, opts, 16, tmp / f"eng1_{method}")
                    r1 = time_ray(folder, n, method, opts, 16, 1, tmp / f"ray1_{method}")
                    r2 = time_ray(folder, n, method, opts, 16, 2, tmp / f"ray2_{method}")
                    ray_rows.append((method, n / one, n / r1, n / r2))
                    print(f"{method}: engine 1t {n / one:.2f}/s, ray1 {n / r1:.2f}/s, ray2 {n / r2:.2f}/s",
                          file=sys.stderr)
            finally:
                ray.shutdown()
                del os.environ["ONNXPLAIN_THREADS"]
            lines += ["", "Batch 16, one onnxruntime thread per worker; a Ray run includes its actors' start-up.", "",
                      "| method | local engine 1 thread | Ray 1 worker | Ray 2 workers | Ray 1 / local | "
                      "2 workers / 1 |", "|---|---|---|---|---|---|"]
            lines += [f"| {m} | {o:.2f} | {a:.2f} | {b:.2f} | {a / o:.2f} | {b / a:.2f} |"
                      for m, o, a, b in ray_rows]
        print("\n".join(lines))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
