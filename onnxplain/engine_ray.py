"""`--engine ray`: the dataset engine's batches on Ray Data.

The driver plans the run exactly as the local engine does (`engine.plan_run`: run keys,
what an earlier run kept, batches under the memory budget), so both engines explain the
same batches. Ray Data then reads the batches (one row each: its entries and their keys),
decodes them in tasks, and explains them in `map_batches` on an actor pool: each actor
holds one `Explainer`, built once, so its sessions are compiled once per actor, with
`num_gpus` per actor where the cluster has GPUs. An actor writes its batch's shard with the
local engine's idempotent writer and returns the records; the driver appends them to the
index in order. Ray retries the batch of an actor that dies (Ray Data restarts actors and
retries their tasks by default): a shard already written by the dead actor is read back,
never written twice under another name, and the driver indexes each batch once.

`ray` is an optional extra (`pip install 'onnxplain[ray]'`); only this module imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import time
from pathlib import Path

import numpy as np

from .datasets import Dataset, Entry
from .engine import INDEX, Job, Plan, Progress, Summary, _Index, as_dataset, finish_index, plan_run, process_batch
from . import errors as _errors
from .errors import OnnxplainError, OptionError

_STOP_TYPES = {name: getattr(_errors, name) for name in dir(_errors)
               if isinstance(getattr(_errors, name), type) and issubclass(getattr(_errors, name), OnnxplainError)}

# Test hook: an actor exits right after writing a shard (once: the file named here is made
# first), as a worker killed mid-run would.
CRASH_ENV = "ONNXPLAIN_RAY_CRASH_ONCE"


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise OptionError("--engine ray needs Ray Data: pip install 'onnxplain[ray]'") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Ray, connected: to `address` (or RAY_ADDRESS) when given, else to the cluster this
    process already joined, else to a local one started now."""
    ray = _ray()
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    return ray


def _decode(row: dict, pre=None, rank=None) -> dict:
    """A batch row's entries loaded (an unreadable input becomes its item's error)."""
    entries = [Entry(**e) for e in json.loads(row["entries"])]
    ds = Dataset(entries, pre, rank)
    # The items travel to the actor inside Ray's own object store, never through a file.
    return {"batch": row["batch"], "keys": row["keys"], "items": pickle.dumps([ds.load(e) for e in entries])}


class _Explain:
    """One actor of the pool: one Explainer for its whole life."""

    def __init__(self, model, job: Job, out: str, extra: dict, on_error: str, threads: int | None,
                 providers=None, memory_budget=None):
        if threads:
            os.environ["ONNXPLAIN_THREADS"] = str(threads)
        if not isinstance(model, (bytes, str)):  # an object reference to the model's bytes
            import ray

            model = ray.get(model)
        from .explainer import Explainer

        self.explainer = Explainer(model, providers=providers, memory_budget=memory_budget)
        self.job, self.out, self.extra, self.on_error = job, Path(out), extra, on_error

    def __call__(self, batch: dict) -> dict:
        out = []
        for b, keys, payload in zip(batch["batch"], batch["keys"], batch["items"]):
            items = pickle.loads(payload)
            plan = Plan(None, json.loads(keys), {}, [], len(items), self.job, self.out, self.extra)
            try:
                records = process_batch(self.explainer, plan, items, self.on_error)
            except OnnxplainError as exc:
                # on_error='stop': the error goes back as an answer, so the driver raises it
                # as it is, not wrapped in Ray's exceptions (which it could not tell apart
                # from a lost worker).
                out.append(json.dumps({"stop": str(exc), "type": type(exc).__name__}))
                continue
            crash = os.environ.get(CRASH_ENV)
            if crash and not os.path.exists(crash):
                Path(crash).write_text(str(os.getpid()))
                os._exit(1)
            out.append(json.dumps(records))
        return {"batch": np.asarray(batch["batch"]), "records": np.array(out, dtype=object)}


def explain_dataset_ray(model, dataset, out, method: str = "gradient", target=None, options: dict | None = None,
                        batch_size: int = 16, resume: bool = False, on_error: str = "skip", float16: bool = False,
                        layer=None, output=None, preset: str | None = None, workers: int | None = None,
                        threads: int | None = 1, num_gpus: float | None = None, address: str | None = None,
                        quiet: bool = False, providers=None, memory_budget: int | None = None,
                        ray_remote_args: dict | None = None, scores: bool = True) -> Summary:
    """`engine.explain_dataset` on Ray Data: `workers` actors (default: the cluster's
    CPUs, or its GPUs), each running onnxruntime with `threads` intra-op threads and
    `num_gpus` GPUs (default: 1 where the cluster has GPUs). Returns a Summary."""
    from .explainer import Explainer
    from .methods.base import get_method
    from .engine import ON_ERROR

    if on_error not in ON_ERROR:
        raise OptionError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    ray = _ray()
    job = Job(get_method(method).name, dict(options or {}), target, layer, output, float16, scores)
    job.resolved()
    t0 = time.perf_counter()
    driver = Explainer(model, providers=providers, memory_budget=memory_budget)
    dataset = as_dataset(dataset, driver, preset)
    plan = plan_run(driver, model, dataset, out, job, batch_size, resume)
    records = dict(plan.kept)
    counts = {"explained": 0, "failed": 0}
    if plan.batches:
        ray = connect(address, num_cpus=workers * (threads or 1) if workers else None)
        resources = ray.cluster_resources()
        if num_gpus is None:
            num_gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        if workers is None:
            workers = int(resources.get("GPU", 0) // num_gpus) if num_gpus else int(resources.get("CPU", 1))
        workers = max(1, min(workers, len(plan.batches)))
        model_bytes = Path(model).read_bytes() if isinstance(model, (str, os.PathLike)) else bytes(model)
        rows = [{"batch": i, "keys": json.dumps({e.id: plan.keys[e.id] for e in b}),
                 "entries": json.dumps([dataclasses.asdict(e) for e in b])} for i, b in enumerate(plan.batches)]
        with _context(ray):  # a Dataset keeps the context it was made in
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        # Decoding takes no CPU slot of its own, so a pool as large as the cluster still
        # leaves room for it; Ray Data's backpressure bounds the decoded batches waiting.
        ds = ds.map(_decode, fn_kwargs={"pre": dataset.preprocess, "rank": dataset.rank}, num_cpus=0,
                    compute=ray.data.TaskPoolStrategy(size=workers))
        ds = ds.map_batches(
            _Explain, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads or 1,
            num_gpus=num_gpus or None,
            fn_constructor_kwargs=dict(model=ray.put(model_bytes), job=job, out=str(plan.out), extra=plan.extra,
                                       on_error=on_error, threads=threads, providers=providers,
                                       memory_budget=memory_budget),
            **(ray_remote_args or {}))
        index = _Index(plan.out / INDEX)
        bar = Progress(sum(len(b) for b in plan.batches), quiet=quiet)
        seen = set()
        try:
            for row in ds.iter_rows():
                if int(row["batch"]) in seen:
                    continue  # a batch Ray gave back twice is indexed once
                seen.add(int(row["batch"]))
                batch_records = json.loads(row["records"])
                if isinstance(batch_records, dict):
                    raise _STOP_TYPES.get(batch_records["type"], OnnxplainError)(batch_records["stop"])
                index.append(batch_records)
                for r in batch_records:
                    records[r["id"]] = r
                    counts["failed" if r.get("error") else "explained"] += 1
                bar.update(len(batch_records))
        except Exception as exc:
            cause = _user_error(exc)
            if cause is not None:
                raise cause from None
            raise
        finally:
            bar.close()
    ordered = finish_index(plan, records)
    return Summary(counts["explained"], len(plan.kept), counts["failed"], plan.batch_size, plan.out / INDEX,
                   ordered, time.perf_counter() - t0)


@contextlib.contextmanager
def _context(ray):
    """Ray Data settings of this run, the caller's restored afterwards: the index in the
    dataset's order; no bars or logs of Ray Data's own over our progress bar."""
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
             ctx.enable_auto_log_stats)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = ctx.print_on_execution_start = ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        yield
    finally:
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
         ctx.enable_auto_log_stats) = saved


def _user_error(exc):
    """The onnxplain error (on_error='stop') inside Ray's wrapping, if that is what it is."""
    from .errors import OnnxplainError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OnnxplainError):
            return exc
        cause = getattr(exc, "cause", None)
        if isinstance(cause, OnnxplainError):
            return cause
        exc = exc.__cause__ or exc.__context__
    return None
