"""onnxruntime sessions: provider choice, batching under a memory budget, progress.

Multi-pass methods (1000 integration steps, 500 noise samples, 4000 masks) hand the
runtime a number of rows and a function that builds the feeds for a range of rows; the
runtime runs as many rows at once as the memory budget allows and hands each chunk's
outputs back, so no method ever holds all passes at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from functools import lru_cache

import numpy as np
import onnx
from onnx import helper

from .errors import InputError, ModelError
from .graph import infer_types

DEFAULT_MEMORY_BUDGET = int(os.environ.get("ONNXPLAIN_MEMORY_BUDGET", 1 << 30))  # bytes
QUIET = False  # set by the CLI's --quiet and by library users who want no progress bars


def _ort():
    import onnxruntime as ort

    # Provider fallbacks are ours to report, and every failed run becomes a typed error that
    # carries onnxruntime's message: its own log lines (in red, mid-run) would only repeat
    # them, or report a multi-row attempt the engine retries row by row.
    ort.set_default_logger_severity(4)
    return ort


# Providers that need libraries beside onnxruntime (CUDA, cuDNN, TensorRT): requested but
# unable to run, they fall back to the next one with one warning line, not an error.
GPU_PROVIDERS = {"CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
                 "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so"}
CUDA_HINT = "pip install 'onnxplain[cuda]' for the CUDA and cuDNN runtime wheels (README: GPU)"
_WARNED: set = set()


@lru_cache(maxsize=None)
def _preload_cuda() -> None:
    """Make CUDA/cuDNN installed as pip wheels (onnxplain[cuda]) loadable: onnxruntime-gpu
    finds them only through its preload_dlls."""
    import importlib.util

    ort = _ort()
    if hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia") is not None:
        with contextlib.suppress(Exception):
            ort.preload_dlls()


@lru_cache(maxsize=None)
def provider_problem(name: str) -> str | None:
    """Why execution provider `name` cannot run a node here, or None when it can.

    onnxruntime-gpu lists CUDAExecutionProvider even where its libraries or a driver are
    missing; a session then logs red errors and silently runs on the CPU. Loading the
    provider's library names the missing library; running a one-node model tells the rest.
    """
    ort = _ort()
    if name == "CPUExecutionProvider":
        return None
    if name not in ort.get_available_providers():
        hint = f"; {CUDA_HINT}" if name in GPU_PROVIDERS else ""
        return f"this onnxruntime ({ort.__version__}) does not include it{hint}"
    if name in GPU_PROVIDERS:
        _preload_cuda()
        import ctypes

        lib = os.path.join(os.path.dirname(ort.__file__), "capi", GPU_PROVIDERS[name])
        if os.path.exists(lib):
            try:
                ctypes.CDLL(lib)
            except OSError as exc:
                hint = CUDA_HINT if name == "CUDAExecutionProvider" else "it needs TensorRT besides CUDA"
                return f"{str(exc).split(': cannot open')[0]} is missing ({hint})"
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    # A missing library or device is an expected answer here, not an error to print.
    ort.set_default_logger_severity(4)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        s = ort.InferenceSession(m.SerializeToString(), so, providers=[name])
        if name not in s.get_providers():
            return "onnxruntime could not create it (no usable device or driver?)"
        s.run(None, {"x": np.ones(1, np.float32)})
        return None
    except Exception as exc:
        return f"it cannot run here: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    finally:
        ort.set_default_logger_severity(4)


def cuda_works() -> bool:
    """True when the CUDA provider is installed *and* can run a node here."""
    return provider_problem("CUDAExecutionProvider") is None


def working_providers() -> list[str]:
    """The installed providers that can run a node here, in onnxruntime's order of preference."""
    return [p for p in _ort().get_available_providers() if provider_problem(p) is None]


def default_providers() -> list[str]:
    env = os.environ.get("ONNXPLAIN_PROVIDERS")
    if env:
        return resolve_providers([p.strip() for p in env.split(",") if p.strip()])
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_works() else ["CPUExecutionProvider"]


def resolve_providers(providers=None) -> list[str]:
    """The providers to run on: those requested that can run here. A misspelt name is an
    error; a known provider that cannot run (CUDA without its libraries) is dropped with one
    warning line saying why, and the CPU takes over where nothing else is left."""
    if providers is None:
        return default_providers()
    if isinstance(providers, str):
        providers = [providers]
    ort = _ort()
    known = set(ort.get_all_providers()) | set(ort.get_available_providers())
    names = [p if isinstance(p, str) else p[0] for p in providers]
    bad = [p for p in names if p not in known]
    if bad:
        raise InputError(f"execution provider(s) {', '.join(bad)} unknown to onnxruntime; installed: "
                         f"{', '.join(ort.get_available_providers())}")
    kept = [p for p, n in zip(providers, names) if provider_problem(n) is None]
    kept = kept or ["CPUExecutionProvider"]
    dropped = [n for n in names if provider_problem(n) is not None]
    for n in dropped:
        if n not in _WARNED:
            _WARNED.add(n)
            to = ", ".join(p if isinstance(p, str) else p[0] for p in kept)
            sys.stderr.write(f"warning: {n} cannot run here, running on {to}: {provider_problem(n)}\n")
    return list(kept)


def gpu_free_bytes() -> int | None:
    """Free memory of the current CUDA device (cudaMemGetInfo), or None where the CUDA
    runtime library cannot be loaded."""
    import ctypes
    import ctypes.util

    names = [n for n in (ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12",
                         "libcudart.so.13", "libcudart.so.11.0") if n]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        with contextlib.suppress(Exception):
            if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
                return int(free.value)
        return None
    return None


# Share of a GPU's free memory that batches may take when no budget was given: onnxruntime's
# arena, the explainer's weights and other processes need the rest.
GPU_BUDGET_SHARE = 0.5


class OutOfMemory(InputError):
    """A run the device had no memory for: `chunked` retries it in smaller chunks."""


def _out_of_memory(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("failed to allocate", "out of memory", "bad_alloc", "cudaerrormemoryallocation"))


class Session:
    """One onnxruntime session on a model, with row-chunked execution.

    `device` is where the session's tensors live ("cuda" when CUDA runs it, else "cpu").
    On a GPU the batch size adapts to the device's free memory (unless a budget was given),
    and a chunk that does not fit is halved and retried."""

    def __init__(self, model: onnx.ModelProto, providers=None, memory_budget: int | None = None,
                 threads: int | None = None):
        ort = _ort()
        self.model = model
        self.providers = resolve_providers(providers)
        self._budget_given = bool(memory_budget) or "ONNXPLAIN_MEMORY_BUDGET" in os.environ
        self.memory_budget = int(memory_budget or DEFAULT_MEMORY_BUDGET)
        so = ort.SessionOptions()
        so.log_severity_level = 4
        # An explicit count (the dataset engine's replicas split the cores) wins over the env.
        threads = threads or os.environ.get("ONNXPLAIN_THREADS")
        if threads:
            so.intra_op_num_threads = int(threads)
        if os.environ.get("ONNXPLAIN_SPIN") == "0":
            # Idle intra-op threads sleep instead of spinning: on cores other processes share,
            # a spinning thread takes the time slices its peers need (results are unchanged).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), so, providers=self.providers)
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        # A model exported with a fixed batch size runs exactly that many rows at once.
        first = self.session.get_inputs()[0].shape if self.input_names else None
        self.fixed_batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._row_bytes = None
        used = self.session.get_providers()
        self.device = "cuda" if used and used[0] == "CUDAExecutionProvider" else "cpu"
        if self.device == "cuda" and not self._budget_given:
            free = gpu_free_bytes()
            if free:
                self.memory_budget = max(self.memory_budget, int(free * GPU_BUDGET_SHARE))

    def run(self, feeds: dict, outputs=None) -> dict:
        outputs = list(outputs or self.output_names)
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        try:
            values = self.session.run(outputs, feeds)
        except Exception as exc:
            if _out_of_memory(exc):
                raise OutOfMemory(f"out of memory: {str(exc).strip().splitlines()[0]}") from None
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"onnxruntime failed to run the model on this input: {msg}") from None
        return dict(zip(outputs, values))

    # --- tensors kept on the device ---------------------------------------------------------
    def on_device(self, a: np.ndarray):
        """An onnxruntime value on this session's device: bound to runs without a copy."""
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)

    def run_bound(self, resident: dict, feeds: dict, outputs) -> dict:
        """One run with I/O binding: `resident` are values already on the device (from
        `on_device`), bound as they are; `feeds` are host arrays copied in; the outputs are
        made on the device and copied back once."""
        binding = self.session.io_binding()
        for k, v in resident.items():
            binding.bind_ortvalue_input(k, v)
        for k, v in feeds.items():
            binding.bind_cpu_input(k, np.ascontiguousarray(v))
        for o in outputs:
            binding.bind_output(o, self.device)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            if _out_of_memory(exc):
                raise OutOfMemory(f"out of memory: {str(exc).strip().splitlines()[0]}") from None
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"onnxruntime failed to run the model on this input: {msg}") from None
        return dict(zip(outputs, binding.copy_outputs_to_cpu()))

    def row_bytes(self) -> int:
        """Upper bound of the memory one batch row needs: all intermediate tensors at once."""
        if self._row_bytes is None:
            self._row_bytes = estimate_row_bytes(self.model)
        return self._row_bytes

    def rows_per_run(self, cap: int | None = None) -> int:
        if self.fixed_batch:
            return self.fixed_batch
        rows = max(1, self.memory_budget // max(1, self.row_bytes()))
        return min(rows, cap) if cap else rows

    def run_rows(self, total: int, make_feeds, outputs, label: str | None = None, cap: int | None = None):
        """Yield (start, stop, outputs) for row chunks [start, stop) covering `total` rows."""
        yield from chunked(self, total, lambda s, e: self.run(make_feeds(s, e), outputs), label, cap)


def chunked(runner, total: int, run_chunk, label, cap):
    """(start, stop, run_chunk(start, stop)) over `total` rows, `runner.rows_per_run(cap)` at
    a time. A chunk the device has no memory for is halved and retried (a fixed batch size
    cannot be), and later chunks keep the smaller size."""
    step = runner.rows_per_run(cap)
    fixed = bool(getattr(runner, "static", None) or getattr(runner, "fixed_batch", None))
    with progress(total, label) as bar:
        start = 0
        while start < total:
            stop = min(total, start + step)
            try:
                out = run_chunk(start, stop)
            except OutOfMemory as exc:
                if fixed or stop - start == 1:
                    raise OutOfMemory(f"{stop - start} row(s) at once do not fit ({exc}); give a smaller memory "
                                      "budget (memory_budget=, ONNXPLAIN_MEMORY_BUDGET) or a smaller input") from None
                step = max(1, (stop - start) // 2)
                continue
            yield start, stop, out
            bar.update(stop - start)
            start = stop


def estimate_row_bytes(model: onnx.ModelProto) -> int:
    try:
        inferred = infer_types(model, strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    total = 0
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if not dims:
            continue
        # The first axis is the batch; every other axis must be known to count the tensor.
        rest = dims[1:]
        if any(d is None for d in rest):
            continue
        size = int(np.prod(rest)) if rest else 1
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize if t.elem_type else 4
        total += size * itemsize
    return max(total, 1 << 16)


class _NoBar:
    def update(self, n):
        pass


@contextlib.contextmanager
def progress(total: int, label: str | None):
    """click's progress bar on stderr, only for an interactive terminal and long runs."""
    if QUIET or not label or total <= 1 or not sys.stderr.isatty():
        yield _NoBar()
        return
    import click

    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar


def steps(n: int, label: str | None):
    """range(n) with a progress bar (as `progress`): for loops of many small runs."""
    with progress(n, label) as bar:
        for i in range(n):
            yield i
            bar.update(1)


class Rows:
    """A session run on batch-first rows whatever the model's layout.

    Methods build rows batch first; a model may keep its batch on another axis (a state
    shaped (2, N, 128), a sequence-first (T, N, C) output) or on none (a tensor that
    merges it). `axes` gives each fed or read tensor's batch axis: rows move from axis 0
    to it and back. A tensor without one is one row per run (`static` rows at a time,
    1 there); `static` also pads the last chunk of a model with a fixed batch size, so
    every run has the shape the model was compiled for. `fixed` inputs are fed as they are.
    """

    def __init__(self, session: Session, axes: dict, fixed: dict | None = None, static: int | None = None,
                 ranks: dict | None = None):
        self.session = session
        self.axes = axes
        # Ranks inference gives the outputs: a run of one row whose output lost its batch
        # axis (a Squeeze without axes squeezes a batch of 1) gets it back.
        self.ranks = ranks or {}
        self.fixed = dict(fixed or {})
        self.static = static
        self.model = session.model

    def rows_per_run(self, cap: int | None = None) -> int:
        return self.static if self.static else self.session.rows_per_run(cap)

    def _physical(self, name, a):
        ax = self.axes.get(name, 0)
        if ax is None:
            return np.asarray(a[0])  # a 0-d row stays an array
        return np.moveaxis(a, 0, ax) if ax else a

    def _logical(self, name, a):
        ax = self.axes.get(name, 0)
        if ax is None:
            return np.asarray(a)[None]
        return np.moveaxis(a, ax, 0) if ax else a

    def run(self, feeds: dict, outputs, optional=()) -> dict:
        """One run of at most rows_per_run() batch-first rows. A model that takes one row
        only without saying so (a state input fixed at batch 1) is run row by row.
        `optional` outputs are read too where they come out with the rows' layout, and left
        out of the result where not (no error)."""
        n = next(iter(feeds.values())).shape[0] if feeds else 1
        if n > 1 and not self.static and not getattr(self, "_one_by_one", False):
            try:
                return self._run(feeds, outputs, optional)
            except OutOfMemory:
                raise  # smaller chunks, not row by row (see `chunked`)
            except InputError:
                self._one_by_one = True
        if n > 1 and getattr(self, "_one_by_one", False):
            parts = [self._run({k: v[i:i + 1] for k, v in feeds.items()}, outputs, optional) for i in range(n)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)}
        return self._run(feeds, outputs, optional)

    def _run(self, feeds: dict, outputs, optional=()) -> dict:
        n = next(iter(feeds.values())).shape[0] if feeds else 1
        rows = n
        if self.static and n < self.static:  # pad to the compiled batch; the pad is dropped
            pad = self.static - n
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in feeds.items()}
        phys = {k: self._physical(k, v) for k, v in feeds.items()}
        for k, v in phys.items():
            # A fed tensor of one row whose batch axis the model squeezed away (the seed
            # of an output a Squeeze without axes made rank-deficient at batch 1).
            ax = self.axes.get(k, 0)
            if max(n, self.static or 0) == 1 and ax is not None and k in self.ranks and v.ndim == self.ranks[k] + 1:
                phys[k] = np.squeeze(v, ax)
        phys.update(self.fixed)
        optional = [k for k in optional if k not in outputs]
        out = self.session.run(phys, list(outputs) + optional)
        ran = max(rows, self.static or 0)
        for k, v in out.items():
            ax = self.axes.get(k, 0)
            if ran == 1 and ax is not None and k in self.ranks and np.ndim(v) == self.ranks[k] - 1 and ax <= np.ndim(v):
                out[k] = np.expand_dims(v, ax)
        for k in optional:
            ax = self.axes.get(k, 0)
            v = out[k]
            if ax is None or np.ndim(v) <= ax or np.shape(v)[ax] != ran:
                del out[k]
        bad = [k for k, v in out.items() if np.ndim(v) == 0 and self.axes.get(k, 0) is not None]
        if bad:
            raise ModelError(f"tensor '{bad[0]}' came out as a scalar: it has no batch axis to read rows from")
        logical = {k: self._logical(k, v) for k, v in out.items()}
        for k, v in logical.items():
            # A batch axis read off shape inference, checked on every run: never rows of
            # one sample taken for another's.
            if v.shape[0] != max(rows, self.static or 0):
                raise ModelError(f"tensor '{k}' came out with {v.shape[0]} rows along its batch axis "
                                 f"{self.axes.get(k, 0)} for {max(rows, self.static or 0)} fed; its layout is not "
                                 "the one shape inference gave")
        return {k: v[:rows] for k, v in logical.items()}

    def run_rows(self, total: int, make_feeds, outputs, label: str | None = None, cap: int | None = None,
                 optional=()):
        yield from chunked(self, total, lambda s, e: self.run(make_feeds(s, e), outputs, optional), label, cap)
