"""GPU benchmark: onnxplain on onnxruntime-gpu (CUDA) against Captum and Zennit on the same
GPU, for ResNet-50 (models.py) and a ViT-B/16 (gpu_models.py), batch 1 and 64.

Per model and batch it times, end to end from a host array to a host attribution (what a
user who saves the result gets):

- floors: onnxruntime CUDA inference of the ONNX model, torch inference (``inference_mode``);
- ``gradient``: ``Explainer.attribute(x, method="gradient", target=3)`` against Captum
  ``Saliency(abs=False)``;
- ``lrp.epsilon_plus_flat`` (ResNet-50 only: neither Zennit nor onnxplain's composites
  have rules for attention products) against Zennit's ``EpsilonPlusFlat`` (BatchNorm
  merged by its canonizer), hooks registered once;
- ``IG-32``: ``integrated_gradients`` with ``n_steps=32`` (Gauss-Legendre, baseline 0)
  against Captum ``IntegratedGradients`` with ``internal_batch_size`` = the rows onnxplain
  runs at once (its GPU memory budget);
- ``occlusion``: window 3x56x56, strides 3x56x56, against Captum ``Occlusion`` with
  ``perturbations_per_eval`` = the same rows.

The torch peers take the host array to the GPU and the attribution back inside the timed
call; ``torch.cuda.synchronize()`` ends it. Weights frozen, ``eval()``. Warm-up calls are
excluded (cuDNN autotuning, onnxruntime's arena); the median of --repeats is reported as
inputs/s, with onnxplain / peer throughput and each result's max |onnxplain - peer| /
max |peer|. The onnxruntime providers each onnxplain session really used are listed: a
CUDA row that silently ran on the CPU would say so.

Writes ``gpu_results.md`` (the RESULTS.md section), ``gpu_results.json`` and prints the
section. ``--dry-run`` runs every code path on the CPU with narrow models at 112x112
(window 28), so the script can be checked where there is no GPU.

    python benchmarks/gpu_bench.py --out DIR [--models resnet50,vit] [--batch 1,64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

TARGET = 3
METHODS = ("gradient", "lrp.epsilon_plus_flat", "integrated_gradients", "occlusion")
LABEL = {"gradient": "gradient", "lrp.epsilon_plus_flat": "lrp.epsilon_plus_flat",
         "integrated_gradients": "IG-32", "occlusion": "occlusion"}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder for the results ($OUT)")
    p.add_argument("--models", default="resnet50,vit", help="comma list: resnet50, vit (default both)")
    p.add_argument("--batch", default="1,64", help="comma list of batch sizes (default 1,64)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, median reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (cuDNN autotuning, arenas)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per measurement at most")
    p.add_argument("--memory-budget", type=int, default=None,
                   help="bytes per onnxruntime run for onnxplain (default: its own, a share of free GPU memory)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only, narrow models at 112x112, batch 1,2, one repeat: checks the code paths")
    a = p.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.batch = [int(b) for b in a.batch.split(",") if b]
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in a.methods if m not in METHODS] + [m for m in a.models if m not in ("resnet50", "vit")]
    if bad:
        p.error(f"unknown method or model: {', '.join(bad)}")
    if a.dry_run:
        a.batch, a.repeats, a.warmup, a.budget = [1, 2], 1, 1, 5.0
    return a


# ----------------------------------------------------------------------------- timing


def timed(fn, repeats: int, warmup: int, budget: float, sync=None):
    result = None
    for _ in range(max(1, warmup)):
        result = fn()
    if sync:
        sync()
    times, spent = [], 0.0
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        result = fn()
        if sync:
            sync()
        dt = time.perf_counter() - t
        times.append(dt)
        spent += dt
        if spent >= budget:
            break
    return statistics.median(times), len(times), result


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# ----------------------------------------------------------------------------- peers


def peer_fn(model, method, opts, dev, chunk):
    """fn(x ndarray) -> attribution ndarray on the host, the torch way."""
    import torch

    def to_dev(x):
        return torch.from_numpy(x).to(dev)

    if method == "gradient":
        from captum.attr import Saliency

        sal = Saliency(model)
        return lambda x: sal.attribute(to_dev(x).requires_grad_(True), target=TARGET, abs=False).cpu().numpy(), None
    if method == "integrated_gradients":
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(model)
        return (lambda x: ig.attribute(to_dev(x), target=TARGET, n_steps=opts["n_steps"], method="gausslegendre",
                                       internal_batch_size=chunk).cpu().numpy()), None
    if method == "occlusion":
        from captum.attr import Occlusion

        occ = Occlusion(model)
        w = opts["window_px"]

        def occlusion(x):
            with torch.no_grad():
                return occ.attribute(to_dev(x), sliding_window_shapes=(3, w, w), strides=(3, w, w), target=TARGET,
                                     perturbations_per_eval=chunk).cpu().numpy()

        return occlusion, None
    if method == "lrp.epsilon_plus_flat":
        import zennit_ref as zr

        attributor = zr.Gradient(model=model, composite=zr.zennit_composite(method))
        attributor.__enter__()

        def lrp(x):
            xt = to_dev(x).requires_grad_(True)
            seed = torch.zeros((x.shape[0], 1000), device=dev)
            seed[:, TARGET] = 1.0
            return attributor(xt, seed)[1].cpu().numpy()

        return lrp, lambda: attributor.__exit__(None, None, None)
    raise ValueError(method)


# ----------------------------------------------------------------------------- one model


def session_providers(e) -> set:
    used = set()
    for value in e._cache.values():
        parts = value if isinstance(value, tuple) else (value,)
        for part in parts:
            sess = getattr(part, "session", None)
            inner = getattr(sess, "session", sess)
            if hasattr(inner, "get_providers"):
                used.add(inner.get_providers()[0])
    return used


def rows_per_run(e, method, opts, x) -> int | None:
    if method == "occlusion":
        return int(e.forward_session({e.graph.inputs[0]: x}, [e.explained_tensor()]).rows_per_run())
    for value in reversed(e._cache.values()):
        if isinstance(value, tuple) and len(value) == 2 and hasattr(value[1], "rows_per_run"):
            return int(value[1].rows_per_run())
    return None


def bench_model(name, args, dev, providers, log):
    import onnxruntime as ort
    import torch

    import gpu_models
    import models
    from onnxplain.explainer import Explainer

    res = 112 if args.dry_run else 224
    width = 0.125 if args.dry_run else 1.0
    if name == "resnet50":
        model, path, shape = models.build("resnet50", width, res)
        disp = "ResNet-50"
    else:
        model, path, shape = gpu_models.build_vit(width * 2 if args.dry_run else 1.0, res, 2 if args.dry_run else 12)
        disp = "ViT-B/16" if not args.dry_run else "ViT (narrow)"
    model = model.to(dev)
    window = res // 4
    e = Explainer(str(path), providers=providers, memory_budget=args.memory_budget)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if args.dry_run:
        so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=providers)
    sync = torch.cuda.synchronize if dev == "cuda" else None
    rows = []
    for batch in args.batch:
        x = np.random.default_rng(batch).standard_normal((batch,) + tuple(shape)).astype(np.float32)
        tc = dict(repeats=args.repeats, warmup=args.warmup, budget=args.budget)
        t_ort, n1, _ = timed(lambda: sess.run(None, {"input": x}), **tc)
        with torch.inference_mode():
            t_torch, n2, _ = timed(lambda: model(torch.from_numpy(x).to(dev)).cpu().numpy(), sync=sync, **tc)
        rows.append(dict(model=disp, batch=batch, method="inference", ours=t_ort, peer=t_torch, n=[n1, n2],
                         note=f"onnxruntime {sess.get_providers()[0]} vs torch"))
        log(f"{disp} b{batch} inference: onnxruntime {t_ort * 1e3:.2f} ms, torch {t_torch * 1e3:.2f} ms")
        for method in args.methods:
            if method.startswith("lrp") and name != "resnet50":
                continue
            opts = {"integrated_gradients": {"n_steps": args.ig_steps},
                    "occlusion": {"window": f"3,{window},{window}", "strides": f"3,{window},{window}"}}.get(method, {})
            try:
                t_ours, n_ours, ours = timed(lambda: e.attribute(x, method=method, target=TARGET, **opts), **tc)
                chunk = rows_per_run(e, method, opts, x)
                fn, close = peer_fn(model, method, dict(opts, window_px=window), dev, chunk or batch)
                try:
                    t_peer, n_peer, ref = timed(lambda: fn(x), sync=sync, **tc)
                finally:
                    if close:
                        close()
                row = dict(model=disp, batch=batch, method=method, ours=t_ours, peer=t_peer, n=[n_ours, n_peer],
                           err=rel_err(ours, ref), rows=chunk, providers=sorted(session_providers(e)))
            except Exception as exc:  # one failure must not hide the other rows
                import traceback

                traceback.print_exc()
                row = dict(model=disp, batch=batch, method=method, error=f"{type(exc).__name__}: "
                                                                         f"{str(exc).splitlines()[0][:200]}")
            rows.append(row)
            log(f"{disp} b{batch} {method}: " + (row.get("error") or
                f"onnxplain {row['ours'] * 1e3:.1f} ms, peer {row['peer'] * 1e3:.1f} ms, err {row['err']:.1e}, "
                f"rows {row['rows']}, providers {row['providers']}"))
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- report


def machine(dev) -> list[str]:
    import onnxruntime as ort
    import torch

    lines = [f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; python {platform.python_version()}"]
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; "
                     f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
    else:
        lines.append(f"- no GPU: dry run on the CPU ({os.cpu_count()} CPUs), torch {torch.__version__}")
    from importlib import metadata

    vers = []
    for mod, dist in (("onnxruntime", None), ("onnx", None), ("captum", None), ("zennit", "zennit"),
                      ("numpy", None)):
        try:
            if dist:  # zennit's package imports torchvision: read its version without importing it
                vers.append(f"{mod} {metadata.version(dist)}")
                continue
            m = __import__(mod)
            v = getattr(m, "__version__", None) or metadata.version(dist or mod)
            vers.append(f"{mod} {v} ({Path(m.__file__).parent.parent})" if mod == "onnxruntime" else f"{mod} {v}")
        except (ImportError, metadata.PackageNotFoundError):
            vers.append(f"{mod} missing")
    lines.append(f"- versions: {', '.join(vers)}; onnxruntime providers available: "
                 f"{', '.join(ort.get_available_providers())}")
    return lines


def render(rows, args, dev) -> str:
    out = ["## GPU: onnxplain on onnxruntime CUDA vs Captum / Zennit on the same GPU", ""]
    out += machine(dev)
    out += [f"- `python benchmarks/gpu_bench.py {' '.join(sys.argv[1:])}`; target class {TARGET}; medians of up to "
            f"{args.repeats} calls after {args.warmup} warm-up calls, host array in and host attribution out for "
            "both; inputs/s = batch / median seconds. `max rel diff` for LRP on ResNet-50 is no check: Zennit's "
            "canonizers do not cover the residual sums (bench_lrp compares on VGG-16); for the gradients a few "
            "ReLUs near zero round apart (see bench_gradients)", "",
            "| model | batch | method | onnxplain ms | peer ms | onnxplain inputs/s | peer inputs/s | "
            "onnxplain / peer throughput | goal >= 1 | rows per run | max rel diff | onnxplain providers |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['batch']} | {LABEL.get(r['method'], r['method'])} | failed: "
                       f"{r['error']} | | | | | | | | |")
            continue
        b = r["batch"]
        if r["method"] == "inference":
            out.append(f"| {r['model']} | {b} | inference (onnxruntime vs torch) | {r['ours'] * 1e3:.2f} | "
                       f"{r['peer'] * 1e3:.2f} | {b / r['ours']:.1f} | {b / r['peer']:.1f} | "
                       f"{r['peer'] / r['ours']:.2f}x | | | | |")
            continue
        ratio = r["peer"] / r["ours"]
        out.append(f"| {r['model']} | {b} | {LABEL[r['method']]} | {r['ours'] * 1e3:.2f} | {r['peer'] * 1e3:.2f} | "
                   f"{b / r['ours']:.1f} | {b / r['peer']:.1f} | {ratio:.2f}x | {'met' if ratio >= 1 else '**not met**'} "
                   f"| {r['rows']} | {r['err']:.1e} | {', '.join(r['providers'])} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA device; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    import onnxruntime as ort

    dev = "cpu" if args.dry_run else "cuda"
    if dev == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* packages torch uses
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print(f"gpu_bench: onnxruntime {ort.__version__} at {ort.__file__} has no CUDA provider "
                  f"({ort.get_available_providers()}); install onnxruntime-gpu (benchmarks/gpu.sh)", file=sys.stderr)
            return 2
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        torch.backends.cudnn.benchmark = True
    else:
        # One thread each: a dry run checks code paths, and on a shared CPU torch's OpenMP
        # barriers with more threads than free cores take seconds per operator.
        providers = ["CPUExecutionProvider"]
        torch.set_num_threads(1)
        os.environ["ONNXPLAIN_THREADS"] = "1"
    from onnxplain import runtime

    runtime.QUIET = True
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "gpu_bench.log"

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    rows = []
    for name in args.models:
        try:
            rows += bench_model(name, args, dev, providers, log)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            rows.append(dict(model=name, batch="", method="all", error=f"{type(exc).__name__}: {exc}"[:300]))
        (args.out / "gpu_results.json").write_text(json.dumps(rows, indent=1, default=str))
    text = render(rows, args, dev)
    (args.out / "gpu_results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
