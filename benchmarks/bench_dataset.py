"""Dataset throughput (inputs/s) on ResNet-50: onnxplain's dataset engine against the peer
user's way (a torch DataLoader loop over Captum and Zennit), against raw onnxruntime for
the black-box method, and the Ray engine with 1 and 2 workers.

Inputs: N JPEG photos (crops and flips of models/chelsea.png), decoded and preprocessed
in every run (shorter side to 256, centre crop 224, ImageNet mean/std), through the
ResNet-50 of models.py (random weights, 224x224; the same weights for torch and ONNX).
Each input is explained for its predicted class. Per method and batch size:

- ``engine``: ``engine.explain_dataset(..., preset="imagenet")`` as ``onnxplain explain
  DIR --out OUT`` runs it (decode threads ahead of onnxruntime, shards, JSONL index with
  the predicted class and score);
- ``peer``: ``torch.utils.data.DataLoader`` (one worker process decoding with PIL, the
  same geometry) and, per batch, the predicted class (a no-grad forward: Captum needs its
  target up front) and the attribution, saved with ``numpy.save``:
  gradient = Captum ``Saliency(abs=False)``; IG-32 = Captum ``IntegratedGradients``
  (``n_steps=32``, Gauss-Legendre, ``internal_batch_size`` = the rows onnxplain runs at
  once); occlusion = Captum ``Occlusion`` (window 3x56x56, strides 3x56x56,
  ``perturbations_per_eval`` = the same rows); ``lrp.epsilon_plus_flat`` = Zennit's
  ``EpsilonPlusFlat`` (BatchNorm merged by its canonizer) with the seed a function of the
  output (one pass, no separate forward), hooks registered once. Weights frozen,
  ``eval()``, the same threads as onnxruntime;
- ``onnxruntime`` (occlusion only): a plain ``InferenceSession`` running the very rows
  the method runs (each image and its 16 occluded copies, built beforehand, untimed), in
  chunks of the rows onnxplain runs at once: the floor for a black-box method;
- Ray (gradient, batch 16): ``engine_ray.explain_dataset_ray`` with 1 and 2 actors of one
  onnxruntime thread on a local cluster started beforehand (actor start-up, which
  compiles the sessions once per actor, is part of every run), against the local engine
  with one onnxruntime thread.

Sessions are compiled before the clock starts (one warm-up batch) for the engine; the
torch peers get one warm-up batch too. Best of --dataset-repeat runs. IG-32 and occlusion
run on fewer photos (--dataset-ig-images, --dataset-occlusion-images) on a small machine: throughput is per input.

    python benchmarks/run.py --only dataset                 # the RESULTS.md section
    python benchmarks/bench_dataset.py --batch 1,16 --dataset-ray off   # alone: prints the section
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

TITLE = "Datasets: ResNet-50 throughput, the dataset engine vs Captum/Zennit loops and raw onnxruntime; Ray (CPU)"
SECTION = "datasets"  # the RESULTS.md block this module writes

PHOTO = ROOT / "models" / "chelsea.png"
WINDOW = 56
METHODS = {
    "gradient": {},
    "lrp.epsilon_plus_flat": {},
    "integrated_gradients": {"n_steps": 32},
    "occlusion": {"window": f"3,{WINDOW},{WINDOW}", "strides": f"3,{WINDOW},{WINDOW}"},
}
LABEL = {"gradient": "gradient", "lrp.epsilon_plus_flat": "lrp.epsilon_plus_flat",
         "integrated_gradients": "IG-32", "occlusion": f"occlusion {WINDOW}"}
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def add_arguments(group) -> None:
    group.add_argument("--dataset-images", type=int, default=64, help="photos for gradient and LRP (default 64)")
    group.add_argument("--dataset-ig-images", type=int, default=16,
                       help="photos for IG-32 (default 16; a batch larger than this runs as one batch of all)")
    group.add_argument("--dataset-occlusion-images", type=int, default=16, help="photos for occlusion (default 16)")
    group.add_argument("--dataset-methods", type=lambda s: [v for v in s.split(",") if v], default=list(METHODS),
                       help=f"comma list of {', '.join(METHODS)}")
    group.add_argument("--dataset-repeat", type=int, default=1, help="best of this many runs (default 1)")
    group.add_argument("--dataset-replicas", type=int, default=1,
                       help="the engine's replicas (explain_dataset(replicas=)), each with threads // replicas "
                            "onnxruntime threads; torch keeps --threads (default 1)")
    group.add_argument("--dataset-ray", choices=("on", "off", "only"), default="on",
                       help="the Ray rows: on, off, or only them")
    group.add_argument("--dataset-ray-images", type=lambda v: sorted({int(x) for x in v.split(",") if x}),
                       default=[16, 48], help="two dataset sizes for the Ray rows (default 16,48: the difference "
                                              "is the start-up free rate)")


# ----------------------------------------------------------------------------- inputs


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


def peer_image(path) -> np.ndarray:
    """What a torch user's transform does (Resize(256) + CenterCrop(224) + ToTensor +
    Normalize), in PIL and numpy since the benchmark needs no torchvision."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - 224) / 2.0)), int(round((h - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - MEAN) / STD


class PhotoSet:
    """A map-style torch dataset of photo paths (a plain class: DataLoader needs only
    __len__ and __getitem__)."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return peer_image(self.paths[i])


# ----------------------------------------------------------------------------- the peers


def peer_step(model, method: str, opts: dict, chunk: int):
    """fn(x: torch.Tensor) -> attribution ndarray, as a careful Captum/Zennit user writes it."""
    import torch

    def predicted(x):
        with torch.no_grad():
            return model(x).argmax(1)

    if method == "gradient":
        from captum.attr import Saliency

        sal = Saliency(model)
        return lambda x: sal.attribute(x.requires_grad_(True), target=predicted(x), abs=False).detach().numpy()
    if method == "integrated_gradients":
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(model)
        return lambda x: ig.attribute(x, target=predicted(x), n_steps=opts["n_steps"], method="gausslegendre",
                                      internal_batch_size=chunk).detach().numpy()
    if method == "occlusion":
        from captum.attr import Occlusion

        occ = Occlusion(model)

        def occlusion(x):
            with torch.no_grad():
                return occ.attribute(x, sliding_window_shapes=(3, WINDOW, WINDOW), strides=(3, WINDOW, WINDOW),
                                     target=predicted(x), perturbations_per_eval=chunk).numpy()

        return occlusion
    if method == "lrp.epsilon_plus_flat":
        import zennit_ref as zr

        attributor = zr.Gradient(model=model, composite=zr.zennit_composite(method))
        attributor.__enter__()  # hooks registered once for the whole run (left by close())

        def one_hot(y):
            return torch.eye(y.shape[1], dtype=y.dtype)[y.argmax(1)]

        def lrp(x):
            return attributor(x.requires_grad_(True), one_hot)[1].detach().numpy()

        lrp.close = lambda: attributor.__exit__(None, None, None)
        return lrp
    raise ValueError(method)


def peer_loader(paths, batch):
    """The peer's DataLoader, one decoding worker process kept alive between passes and
    started by an untimed pass: the steady state of a long run, not a worker's start-up."""
    from torch.utils.data import DataLoader

    loader = DataLoader(PhotoSet(paths), batch_size=batch, shuffle=False, num_workers=1, persistent_workers=True)
    for _ in loader:
        pass
    return loader


def time_peer(step, loader, paths, batch, out: Path) -> float:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    step(torch.from_numpy(np.stack([peer_image(p) for p in paths[:batch]])))  # warm-up batch
    t = time.perf_counter()
    for i, x in enumerate(loader):
        np.save(out / f"batch{i}.npy", step(x))
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- onnxplain and onnxruntime


def time_engine(model_path, e, folder, paths, method, opts, batch, out: Path, scores: bool = True) -> float:
    from onnxplain.datasets import preprocess_for
    from onnxplain.engine import explain_dataset
    from onnxplain.io import load_inputs

    shutil.rmtree(out, ignore_errors=True)
    replicas = e if isinstance(e, list) else [e]
    warm = load_inputs(paths[:batch], preprocess_for(replicas[0], "imagenet"), list(replicas[0].inputs.values())[0])
    for r in replicas:  # every replica's sessions compiled before the clock
        r.attribute(warm.batch, method=method, **opts)
    t = time.perf_counter()
    s = explain_dataset(model_path, folder, out, method=method, options=opts, batch_size=batch, explainer=e,
                        quiet=True, preset="imagenet", scores=scores)
    dt = time.perf_counter() - t
    assert s.explained == len(paths) and not s.failed, s
    return dt


def occlusion_rows(x: np.ndarray) -> np.ndarray:
    """Each image followed by its occluded copies (window 3x56x56, zeros), as the method runs them."""
    n, c, h, w = x.shape
    cells = [(a, b) for a in range(0, h - WINDOW + 1, WINDOW) for b in range(0, w - WINDOW + 1, WINDOW)]
    rows = np.repeat(x[:, None], len(cells) + 1, axis=1)
    for k, (a, b) in enumerate(cells, start=1):
        rows[:, k, :, a:a + WINDOW, b:b + WINDOW] = 0.0
    return rows.reshape((-1, c, h, w))


def time_ort_occlusion(sess, in_name, paths, batch, chunk) -> float:
    batches = [occlusion_rows(np.stack([peer_image(p) for p in paths[i:i + batch]]))
               for i in range(0, len(paths), batch)]
    sess.run(None, {in_name: batches[0][:chunk]})
    t = time.perf_counter()
    for rows in batches:
        for s in range(0, len(rows), chunk):
            sess.run(None, {in_name: rows[s:s + chunk]})
    return time.perf_counter() - t


def onnxplain_rows(e, method, opts, x) -> int:
    """Rows per onnxruntime run onnxplain uses for `method` on inputs like x (its memory budget)."""
    if method == "occlusion":
        return int(e.forward_session({e.graph.inputs[0]: x}, [e.explained_tensor()]).rows_per_run())
    e.attribute(x, method=method, **opts)
    for value in reversed(e._cache.values()):  # the explainer session that call used last
        if isinstance(value, tuple) and len(value) == 2 and hasattr(value[1], "rows_per_run"):
            return int(value[1].rows_per_run())
    raise RuntimeError("no compiled explainer session found in the Explainer's cache")


# ----------------------------------------------------------------------------- Ray


def time_ray(model_path, folder, n, method, opts, batch, workers, out: Path) -> float:
    from onnxplain.engine_ray import explain_dataset_ray

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = explain_dataset_ray(model_path, folder, out, method=method, options=opts, batch_size=batch, workers=workers,
                            threads=1, quiet=True, preset="imagenet")
    dt = time.perf_counter() - t
    assert s.explained == n and not s.failed, s
    return dt


def ray_rows(model_path, tmp, sizes, repeat, log):
    """Per engine (local with one thread, Ray with 1 and 2 one-thread workers), the best
    seconds for each dataset size in `sizes` (gradient, batch 16): the rate over the
    largest includes each run's start-up; the difference of two sizes is start-up free."""
    import ray

    from onnxplain.explainer import Explainer

    folder = tmp / "ray_photos"
    folder.mkdir()
    paths = make_photos(folder, max(sizes))
    subsets = {}
    for n in sizes:
        sub = tmp / f"ray_photos_{n}"
        sub.mkdir()
        for p in paths[:n]:
            os.link(p, sub / p.name)
        subsets[n] = (sub, paths[:n])
    old = os.environ.get("ONNXPLAIN_THREADS")
    os.environ["ONNXPLAIN_THREADS"] = "1"
    out = []
    try:
        e1 = Explainer(model_path)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=2 * 1024**3)
        try:
            method, opts = "gradient", METHODS["gradient"]
            best = {k: {n: [] for n in sizes} for k in ("local", "ray1", "ray2")}
            for _ in range(repeat):
                for n, (sub, ps) in subsets.items():
                    best["local"][n].append(time_engine(model_path, e1, sub, ps, method, opts, 16, tmp / "l1"))
                    best["ray1"][n].append(time_ray(model_path, sub, n, method, opts, 16, 1, tmp / "r1"))
                    best["ray2"][n].append(time_ray(model_path, sub, n, method, opts, 16, 2, tmp / "r2"))
            secs = {k: {n: min(v) for n, v in d.items()} for k, d in best.items()}
            log("ray gradient seconds: " + ", ".join(f"{k} {d}" for k, d in secs.items()))
            out.append((method, secs))
        finally:
            ray.shutdown()
    finally:
        if old is None:
            os.environ.pop("ONNXPLAIN_THREADS", None)
        else:
            os.environ["ONNXPLAIN_THREADS"] = old
    return out


# ----------------------------------------------------------------------------- main


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main(args) -> str:
    import torch

    import models
    from onnxplain import runtime
    from onnxplain.explainer import Explainer
    from run import configure_threads, ort_session

    configure_threads(args.threads)
    runtime.QUIET = True
    defaults = dict(dataset_images=64, dataset_ig_images=16, dataset_occlusion_images=16, dataset_methods=list(METHODS), dataset_repeat=1, dataset_replicas=1,
                    dataset_ray="on", dataset_ray_images=[16, 48])
    for k, v in defaults.items():
        if not hasattr(args, k):
            setattr(args, k, v)
    batches = sorted(set(args.batch))
    unknown = [m for m in args.dataset_methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")

    def log(msg):
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    # 224x224 always: the occlusion window (56) and the ImageNet crop are defined on it.
    width = args.width
    model, model_path, _shape = models.build("resnet50", width, 224)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    lines, rows, ray_out, notes = [], [], [], []
    try:
        sizes = {"fast": args.dataset_images, "integrated_gradients": args.dataset_ig_images,
                 "occlusion": args.dataset_occlusion_images}
        folders = {}
        for n in set(sizes.values()):
            folder = tmp / f"photos_{n}"
            folder.mkdir()
            folders[n] = (folder, make_photos(folder, n))
        if args.dataset_ray != "only":
            reps = max(1, int(getattr(args, "dataset_replicas", 1) or 1))
            e = Explainer(model_path) if reps == 1 else \
                [Explainer(model_path, threads=max(1, args.threads // reps)) for _ in range(reps)]
            first = e[0] if isinstance(e, list) else e
            sess = ort_session(model_path, args.threads)
            in_name = sess.get_inputs()[0].name
            for method in args.dataset_methods:
                opts = METHODS[method]
                folder, paths = folders[sizes.get(method, sizes["fast"])]
                n = len(paths)
                for batch in sorted({min(b, n) for b in batches}):
                    x0 = np.stack([peer_image(p) for p in paths[:batch]])
                    chunk = onnxplain_rows(first, method, opts, x0)
                    step = peer_step(model, method, opts, chunk)
                    loader = peer_loader(paths, batch)
                    t = {"engine": [], "peer": [], "ort": [], "engine_bare": []}
                    for _ in range(args.dataset_repeat):
                        t["engine"].append(time_engine(model_path, e, folder, paths, method, opts, batch,
                                                       tmp / "eng"))
                        t["peer"].append(time_peer(step, loader, paths, batch, tmp / "peer"))
                        if method == "occlusion":
                            t["ort"].append(time_ort_occlusion(sess, in_name, paths, batch, chunk))
                            t["engine_bare"].append(time_engine(model_path, e, folder, paths, method, opts, batch,
                                                                tmp / "eng", scores=False))
                    if hasattr(step, "close"):
                        step.close()
                    del loader  # its worker process ends with it
                    rate = {k: (n / min(v) if v else None) for k, v in t.items()}
                    rows.append((method, batch, n, chunk, rate))
                    log(f"{method} b{batch} n{n} chunk {chunk}: " +
                        ", ".join(f"{k} {v:.3g}/s" for k, v in rate.items() if v))
            del e, first, sess
        if args.dataset_ray != "off":
            ray_out = ray_rows(model_path, tmp, args.dataset_ray_images, args.dataset_repeat, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines.append(f"ResNet-50 (models.py, width {width:g}, 224x224), JPEG photos decoded and preprocessed in every "
                 f"run, {args.threads} threads for torch and onnxruntime alike"
                 + (f" (onnxplain as {args.dataset_replicas} engine replicas of {max(1, args.threads // args.dataset_replicas)} "
                    "thread(s) each)" if args.dataset_replicas > 1 else "") + f", best of {args.dataset_repeat}; "
                 f"gradient and LRP over {sizes['fast']} photos, IG-32 over {sizes['integrated_gradients']}, "
                 f"occlusion over {sizes['occlusion']} (throughput is per input; a batch larger than the set runs "
                 "as one batch of all). Inputs/s; `rows` is what onnxplain runs per onnxruntime call, "
                 "also Captum's `internal_batch_size` / `perturbations_per_eval`.")
    if rows:
        lines += ["", "| method | batch | photos | rows | onnxplain engine | peer (DataLoader + Captum/Zennit) | "
                      "engine / peer | raw onnxruntime | engine / onnxruntime | engine without scores / onnxruntime |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method, batch, n, chunk, r in rows:
            peer = "Zennit" if method.startswith("lrp") else "Captum"
            ort = r["ort"]
            ort_cells = ["", "", ""] if ort is None else [f"{ort:.3g}", f"{r['engine'] / ort:.2f}",
                                                          f"{r['engine_bare'] / ort:.2f}"]
            lines.append(f"| {LABEL[method]} | {batch} | {n} | {chunk} | {r['engine']:.3g} | {r['peer']:.3g} ({peer}) "
                         f"| {r['engine'] / r['peer']:.2f}x | " + " | ".join(ort_cells) + " |")
        lines += ["", "Goals:", ""]
        worst = min(rows, key=lambda row: row[4]["engine"] / row[4]["peer"])
        for method in dict.fromkeys(r[0] for r in rows):
            ratios = [r[4]["engine"] / r[4]["peer"] for r in rows if r[0] == method]
            lines.append(f"- {LABEL[method]}: engine / peer {', '.join(f'{v:.2f}x' for v in ratios)} "
                         f"(batch {', '.join(str(r[1]) for r in rows if r[0] == method)}): goal >= 1.5x "
                         f"{verdict(min(ratios) >= 1.5)}")
        occ = [r for r in rows if r[4]["ort"]]
        if occ:
            ratios = [r[4]["engine"] / r[4]["ort"] for r in occ]
            lines.append(f"- occlusion, engine / raw onnxruntime {', '.join(f'{v:.2f}' for v in ratios)}: goal >= 0.90 "
                         f"{verdict(min(ratios) >= 0.9)}")
        lines.append(f"- lowest engine / peer: {LABEL[worst[0]]} at batch {worst[1]}, "
                     f"{worst[4]['engine'] / worst[4]['peer']:.2f}x")
    if ray_out:
        small, large = args.dataset_ray_images[0], args.dataset_ray_images[-1]
        lines += ["", f"Ray: gradient, batch 16, one onnxruntime thread per worker, a local cluster "
                      f"(`ray.init(num_cpus=2)`) started beforehand. `total`: inputs/s over {large} photos, each "
                      "run's start-up included (Ray: actors started, sessions compiled once per actor; local: "
                      "planning); `steady`: the start-up free rate, "
                      f"({large} - {small}) / (t({large}) - t({small})).", "",
                  "| engine | total inputs/s | steady inputs/s | overhead vs local 1 thread, total | "
                  "overhead, steady | scaling 2 workers / (2 x 1 worker), total | scaling, steady |",
                  "|---|---|---|---|---|---|---|"]
        for method, secs in ray_out:
            total = {k: large / d[large] for k, d in secs.items()}
            steady = {k: ((large - small) / (d[large] - d[small]) if d[large] > d[small] else float("nan"))
                      for k, d in secs.items()} if small < large else {k: float("nan") for k in secs}
            for k, label in (("local", "local engine, 1 thread"), ("ray1", "Ray, 1 worker"),
                             ("ray2", "Ray, 2 workers")):
                if k == "local":
                    over = ["", ""]
                else:
                    base = 2 if k == "ray2" else 1
                    over = [f"{base * total['local'] / total[k] - 1:+.0%}" if base == 1 else "",
                            f"{base * steady['local'] / steady[k] - 1:+.0%}" if base == 1 else ""]
                scale = ["", ""] if k != "ray2" else [f"{total['ray2'] / (2 * total['ray1']):.0%}",
                                                       f"{steady['ray2'] / (2 * steady['ray1']):.0%}"]
                lines.append(f"| {label} | {total[k]:.3g} | {steady[k]:.3g} | {over[0]} | {over[1]} | {scale[0]} "
                             f"| {scale[1]} |")
            o_total, o_steady = total["local"] / total["ray1"] - 1, steady["local"] / steady["ray1"] - 1
            notes.append(f"- `--engine ray` overhead (1 worker against the local engine, one thread each): "
                         f"{o_total:+.0%} with start-up ({verdict(o_total <= 0.15)}, goal <= 15%), "
                         f"{o_steady:+.0%} steady ({verdict(o_steady <= 0.15)})")
            local_n = [row[4]["engine"] for row in rows if row[0] == method and row[1] == 16]
            if local_n:
                notes.append(f"- Ray with 2 workers x 1 thread, {total['ray2']:.2f}/s total and {steady['ray2']:.2f}/s "
                             f"steady, against the local engine with {args.threads} threads, {local_n[0]:.2f}/s "
                             f"(the table above, {sizes['fast']} photos)")
        lines += [""] + notes
    return "\n".join(lines)


if __name__ == "__main__":
    from run import finish_args, make_parser

    parser = make_parser()
    add_arguments(parser.add_argument_group("bench_dataset"))
    print(main(finish_args(parser.parse_args())))
