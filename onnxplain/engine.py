"""The dataset engine: explain a whole dataset, streaming, resumable.

Worker threads decode and preprocess the next batches (a bounded queue: at most
`prefetch` batches wait decoded) while onnxruntime explains the current one; each batch's
attributions go to one shard `.npz` in the output folder and its records to the JSON-lines
index `index.jsonl` (input id -> shard, row, target, predicted class, score, method,
options, run key), in the dataset's order.

Resumption: every record carries its input's run key (`onnxplain.runkey`: model bytes,
method and resolved options, target, input bytes and preprocessing, layer, dtype,
onnxplain version). A resumed run keeps the records whose key is the key asked now and
explains only the rest. A shard is named by the keys of its rows and written under a
temporary name then renamed, so writing it again (a retried batch, a crash between the
shard and the index) gives the same file, and a shard already on disk is read back
instead of recomputed: nothing is computed twice and no row is indexed twice.

The Ray engine (`onnxplain.engine_ray`) runs the same batches through `explain_batch`
and `write_shard`, so both give the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .datasets import Dataset, Item, input_rank, open_dataset, preprocess_for
from .errors import InputError, OnnxplainError, OptionError

INDEX = "index.jsonl"
RUN = "run.json"
ON_ERROR = ("skip", "stop")

__all__ = ["Job", "Summary", "explain_dataset", "explain_batch", "write_shard", "read_index", "load_results"]


@dataclasses.dataclass
class Job:
    """What is asked of every input: everything here (and the input) changes a result."""

    method: str = "gradient"
    options: dict = dataclasses.field(default_factory=dict)
    target: object = None  # None: the dataset's target where it has one, else the predicted class
    layer: str | None = None
    output: object = None
    float16: bool = False
    scores: bool = True  # the predicted class and score in the index (one forward pass a batch)

    def resolved(self) -> dict:
        from .methods.base import get_method

        return get_method(self.method).resolve(dict(self.options))

    def key_parts(self, model_digest: str) -> dict:
        from .runkey import target_text

        target = None if self.target is None else target_text(self.target)
        return {"model": model_digest, "method": self.method, "options": self.resolved(), "target": target,
                "layer": self.layer, "output": None if self.output is None else str(self.output),
                "dtype": "float16" if self.float16 else "float32", "scores": self.scores}


@dataclasses.dataclass
class Summary:
    """What a run did: inputs explained now, reused from an earlier run, failed; the batch
    size used; the index and its records (dataset order)."""

    explained: int
    reused: int
    failed: int
    batch_size: int
    index: Path
    records: list
    seconds: float

    @property
    def rate(self) -> float:
        return self.explained / self.seconds if self.seconds > 0 else float("nan")


# ----------------------------------------------------------------------------- one batch


def stack_inputs(items) -> np.ndarray | dict:
    first = items[0].inputs
    if isinstance(first, dict):
        return {k: np.concatenate([it.inputs[k] for it in items]) for k in first}
    return np.concatenate([it.inputs for it in items])


def explain_batch(explainer, items, job: Job) -> tuple[dict, list]:
    """(arrays of the shard, one record per item) for loaded items explained together: the
    explained tensor's values (predicted class and score), then the attribution for each
    item's target (-t, else the dataset's, else the predicted class)."""
    x = stack_inputs(items)
    n = len(items)
    given = [it.target is not None for it in items]
    # The explained tensor's values give the predicted class and score. A run that explains
    # computes them anyway (a single-pass explainer's forward half, the forward pass that
    # finds the predicted class): they are read from it, so the model runs once a batch.
    # Only a batch mixing given and missing targets needs them before the attribution.
    flat = predicted = None

    def read(values):
        nonlocal flat, predicted
        values = np.asarray(values)
        # A class per sample only on a (batch, classes) tensor (size-1 axes aside).
        classy = values.ndim >= 1 and values.shape[0] == n and sum(d > 1 for d in values.shape[1:]) <= 1
        flat = values.reshape(n, -1) if classy else None
        predicted = flat.argmax(axis=1) if flat is not None else None

    mixed = job.target is None and any(given) and not all(given)
    if mixed:
        read(explainer.predict(x, explainer.explained_tensor(job.output)))
    if job.target is not None:
        target = job.target
    elif mixed:
        target = [it.target if it.target is not None else int(p) for it, p in zip(items, predicted)] \
            if predicted is not None else None
        if target is None:
            raise InputError("the dataset gives targets but the explained output has no class per sample")
    elif all(given) and any(given):
        target = [it.target for it in items]
    else:
        target = None
    attr, values = explainer.attribute_scored(x, method=job.method, target=target, layer=job.layer,
                                              output=job.output, **job.options)
    if flat is None and values is not None and job.scores:
        read(values)
    if flat is None and job.scores:  # a method whose runs never saw the unperturbed output
        read(explainer.predict(x, explainer.explained_tensor(job.output)))
    if job.target is not None:
        classes = _classes(job.target, n)
    elif target is not None:
        classes = list(target)
    else:  # the predicted class, as the explainer found it
        classes = [int(p) for p in predicted] if predicted is not None else None
    named = attr if isinstance(attr, dict) else {"attribution": attr}
    dtype = np.float16 if job.float16 else np.float32
    arrays = {("attribution" if k == "attribution" else f"attribution/{k}"): np.ascontiguousarray(v, dtype=dtype)
              for k, v in named.items()}
    for k, v in arrays.items():
        if v.shape[0] != n:
            raise InputError(f"the attribution '{k}' has shape {v.shape}, not one row per input of the batch")
    records = []
    for i, it in enumerate(items):
        c = classes[i] if classes is not None else None
        score = float(flat[i, c]) if job.scores and flat is not None and c is not None and 0 <= c < flat.shape[1] \
            else None
        records.append({"id": it.id, "input": it.entry.path, "row": i, "target": c,
                        "predicted": int(predicted[i]) if predicted is not None else None, "score": score})
    return arrays, records


def _classes(target, n):
    from .target import as_target

    values = getattr(as_target(target), "values", None)
    if values is None:
        return None
    values = list(values)
    return values * n if len(values) == 1 else values


# ----------------------------------------------------------------------------- shards


def shard_name(keys) -> str:
    """A shard's file name from its rows' keys: the same batch always gets the same name."""
    return "shard-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20] + ".npz"


def write_shard(out: Path, name: str, arrays: dict, records: list) -> Path:
    """Write a shard atomically: a temporary file renamed over its name (a crash leaves
    either no shard or the whole shard). The records go inside too, so the index can be
    rebuilt from the shards."""
    out = Path(out)
    path = out / name
    tmp = out / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    payload = dict(arrays)
    payload["records"] = np.array(json.dumps(records))
    with tmp.open("wb") as fh:
        np.savez(fh, **payload)
    # The rename makes the shard whole or absent for any interrupt of the process (not
    # for a power loss: no fsync, which costs more than a small shard's write).
    os.replace(tmp, path)
    return path


def read_shard_records(path: Path) -> list | None:
    """The records stored in a shard, or None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["records"]))
    except (OSError, KeyError, ValueError, EOFError):
        return None


def load_results(out, ids=None) -> dict:
    """{id: attribution} from an output folder (for `ids`, else every explained input)."""
    out = Path(out)
    records = [r for r in read_index(out / INDEX) if r.get("shard")]
    if ids is not None:
        wanted = set(ids)
        records = [r for r in records if r["id"] in wanted]
    result, open_shards = {}, {}
    for r in records:
        z = open_shards.get(r["shard"])
        if z is None:
            z = open_shards[r["shard"]] = np.load(out / r["shard"], allow_pickle=False)
        names = [k for k in z.files if k.startswith("attribution")]
        result[r["id"]] = z["attribution"][r["row"]] if names == ["attribution"] else \
            {k.split("/", 1)[-1]: z[k][r["row"]] for k in names}
    for z in open_shards.values():
        z.close()
    return result


# ----------------------------------------------------------------------------- the index


def read_index(path: Path) -> list:
    """The records of an index; a last line cut short by an interrupt is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break  # written halfway when the run stopped: that batch is done again
            raise InputError(f"{path} line {i + 1} is not JSON; remove the line or run without --resume") from None
    return out


def _write_index(path: Path, records) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


class _Index:
    """The index file, appended one batch at a time."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, records) -> None:
        with self.path.open("a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
            fh.flush()


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass
class Plan:
    """A run laid out: the keyed entries still to do, in batches, and the records kept."""

    dataset: Dataset
    keys: dict  # id -> run key
    kept: dict  # id -> record reused
    batches: list  # lists of entries
    batch_size: int
    job: Job
    out: Path
    extra: dict  # method, options written into every record


def plan_run(explainer, model, dataset: Dataset, out, job: Job, batch_size: int = 16, resume: bool = False,
             workers: int = 4, budget: int | None = None) -> Plan:
    """Keys of every entry, what an earlier run already did (with `resume`), and the
    batches of what is left (consecutive, at most `batch_size` and under the memory budget)."""
    from .runkey import model_digest, run_key

    if not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch size must be a positive integer, got {batch_size!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = job.key_parts(model_digest(model))
    pre = dataset.preprocess
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(lambda e: e.digest(pre), dataset.entries))
    keys = {e.id: run_key(**parts, input=d, dataset_target=e.target) for e, d in zip(dataset.entries, digests)}
    index = out / INDEX
    for stale in out.glob(".shard-*.tmp"):
        stale.unlink()  # a shard write an interrupt cut short: never renamed, never indexed
    kept = {}
    if resume:
        for r in read_index(index):
            if keys.get(r.get("id")) == r.get("key") and (r.get("error") or (out / str(r.get("shard"))).is_file()):
                kept[r["id"]] = r
        # The index keeps only what this run stands by, in dataset order (a record with an
        # old key, of other options, goes): a row is never listed twice.
        _write_index(index, [kept[e.id] for e in dataset.entries if e.id in kept])
    else:
        for old in out.glob("shard-*.npz"):
            old.unlink()
        index.write_text("")
    todo = [e for e in dataset.entries if e.id not in kept]
    size = batch_size
    if todo:
        size = min(batch_size, rows_under_budget(explainer, dataset, todo, job, budget))
    batches = [todo[i:i + size] for i in range(0, len(todo), size)]
    extra = {"method": job.method, "options": canonical_options(job)}
    (out / RUN).write_text(json.dumps({"method": job.method, "options": extra["options"],
                                       "target": parts["target"], "layer": job.layer, "dtype": parts["dtype"],
                                       "model": parts["model"], "dataset": dataset.source,
                                       "batch_size": size}, indent=1))
    return Plan(dataset, keys, kept, batches, size, job, out, extra)


def canonical_options(job: Job) -> dict:
    from .runkey import canonical

    return canonical(job.resolved())


def rows_under_budget(explainer, dataset: Dataset, todo, job: Job, budget: int | None = None) -> int:
    """Rows of one batch such that one run of the model on it fits the Explainer's memory
    budget (every intermediate tensor of every row at once, as `runtime.Session` counts
    them), and `budget` too where given (a replica's share); inputs the engine holds are
    at most `prefetch` such batches. The first readable input gives the shapes."""
    for e in todo[:16]:
        item = dataset.load(e)
        if item.error is None:
            break
    else:
        return len(todo)  # nothing readable among the first: the batches only report errors
    feeds = explainer.feeds(item.inputs)
    rows = explainer.forward_session(feeds, [explainer.explained_tensor(job.output)])
    fits = rows.rows_per_run()
    if budget and not (rows.static or rows.session.fixed_batch):
        fits = min(fits, budget // max(1, rows.session.row_bytes()))
    return max(1, fits)


# ----------------------------------------------------------------------------- running


def process_batch(explainer, plan: Plan, items, on_error: str) -> list:
    """Records of one batch of loaded items: its shard written (or found on disk from an
    earlier try), inputs that failed to load or to explain recorded with their error."""
    keys = [plan.keys[it.id] for it in items]
    name = shard_name(keys)
    path = plan.out / name
    stored = read_shard_records(path) if path.is_file() else None
    if stored is not None and all(plan.keys.get(r.get("id")) == r.get("key") for r in stored):
        # Written by an earlier try of this very batch (a crash before its index lines, a
        # retried Ray task): read back, not recomputed.
        by_id = {r["id"]: r for r in stored}
        return [by_id.get(it.id) or _error_record(it, plan, it.error) for it in items]
    good = [it for it in items if it.error is None]
    bad = {it.id: it.error for it in items if it.error is not None}
    if bad and on_error == "stop":
        first = next(iter(bad))
        raise InputError(f"input {first}: {bad[first]}")
    arrays, records = {}, []
    if good:
        try:
            arrays, records = explain_batch(explainer, good, plan.job)
        except OnnxplainError as exc:
            if on_error == "stop" or len(good) == 1:
                if on_error == "stop":
                    raise
                bad[good[0].id] = str(exc)
                good = []
            else:
                # One input spoils the batch (a NaN, a wrong shape): the others are explained
                # one by one, so the bad one is found and named.
                return _one_by_one(explainer, plan, items, on_error)
    for r in records:
        r.update(plan.extra, shard=name, key=plan.keys[r["id"]])
    if records:
        write_shard(plan.out, name, arrays, records)
    by_id = {r["id"]: r for r in records}
    return [by_id.get(it.id) or _error_record(it, plan, bad.get(it.id)) for it in items]


def _one_by_one(explainer, plan, items, on_error):
    out = []
    for it in items:
        out += process_batch(explainer, plan, [it], on_error)
    return out


def _error_record(item: Item, plan: Plan, error) -> dict:
    return {"id": item.id, "input": item.entry.path, "error": str(error), "shard": None,
            "target": item.target, **plan.extra, "key": plan.keys[item.id]}


class Progress:
    """`done/total [rate inputs/s, ETA]` on stderr; silent unless stderr is a terminal."""

    def __init__(self, total: int, label: str = "explaining", quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.on = not quiet and total > 0 and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.done, self.label = total, 0, label
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if not self.on:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = f"{int(eta // 60)}:{int(eta % 60):02d}" if eta == eta else "?"
        self.stream.write(f"\r{self.label} {self.done}/{self.total} [{rate:.1f} inputs/s, ETA {eta_text}]  ")
        self.stream.flush()

    def close(self) -> None:
        if self.on:
            self.stream.write("\n")
            self.stream.flush()


def explain_dataset(model, dataset, out, method: str = "gradient", target=None, options: dict | None = None,
                    batch_size: int = 16, resume: bool = False, on_error: str = "skip", float16: bool = False,
                    layer=None, output=None, preset: str | None = None, workers: int = 4, prefetch: int = 2,
                    quiet: bool = False, explainer=None, providers=None, memory_budget: int | None = None,
                    scores: bool = True, replicas: int = 1) -> Summary:
    """Explain every input of `dataset` (a Dataset, or anything `open_dataset` reads)
    with `method`, streaming the attributions into shards in `out` and the records into
    `out/index.jsonl`. `model` is a path or bytes (what the run key hashes); pass an
    `explainer` built on it to reuse its compiled sessions. `scores=False` leaves the
    predicted class and score out of the index (and spares a forward pass a batch).
    `replicas` > 1 explains that many batches at once, each on its own Explainer of the
    model (`explainer` is the first) with its share of the threads and of the memory
    budget (see `replica_shares`). `explainer` may also be a list of Explainers of the
    model, used as they are, one replica each (sessions compiled by an earlier run are
    reused; their threads and budgets are the caller's). Returns a Summary."""
    from .explainer import Explainer
    from .methods.base import get_method

    if on_error not in ON_ERROR:
        raise OptionError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if not isinstance(prefetch, int) or prefetch < 1:
        raise OptionError(f"prefetch must be a positive integer, got {prefetch!r}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise OptionError(f"replicas must be a positive integer, got {replicas!r}")
    job = Job(get_method(method).name, dict(options or {}), target, layer, output, float16, scores)
    job.resolved()  # a bad option fails before any work
    t0 = time.perf_counter()
    share = None
    given = list(explainer) if isinstance(explainer, (list, tuple)) else None
    if given is not None:
        if not given or replicas not in (1, len(given)):
            raise OptionError(f"a list of {len(given)} explainers is {len(given)} replicas; replicas={replicas} "
                              "asks for another number")
        replicas, explainer = len(given), given[0]
    if given is not None and replicas > 1:
        ready = iter(given[1:])
        lock = threading.Lock()

        def make_replica():
            with lock:
                return next(ready)
    elif replicas == 1:
        explainer = explainer or Explainer(model, providers=providers, memory_budget=memory_budget)
    else:
        share, threads = replica_shares(explainer, memory_budget, replicas)
        first = explainer or Explainer(model, providers=providers, memory_budget=share, threads=threads)

        def make_replica():
            return Explainer(model, providers=getattr(first, "providers", providers), memory_budget=share,
                             threads=getattr(first, "threads", None) or threads)

        explainer = first
    restore = _run_under(explainer, share) if share is not None else None
    try:
        dataset = as_dataset(dataset, explainer, preset)
        plan = plan_run(explainer, model, dataset, out, job, batch_size, resume, workers, budget=share)
    except BaseException:
        if restore is not None:
            restore()
        raise
    index = _Index(plan.out / INDEX)
    records = dict(plan.kept)
    counts = {"explained": 0, "failed": 0}
    bar = Progress(sum(len(b) for b in plan.batches), quiet=quiet)

    def take(batch_records, n):
        index.append(batch_records)
        for r in batch_records:
            records[r["id"]] = r
            counts["failed" if r.get("error") else "explained"] += 1
        bar.update(n)

    try:
        if replicas == 1:
            for items in _prefetched(dataset, plan.batches, workers, prefetch):
                take(process_batch(explainer, plan, items, on_error), len(items))
        else:
            _replicated(_prefetched(dataset, plan.batches, workers, prefetch), explainer, make_replica, replicas,
                        plan, on_error, take)
    finally:
        bar.close()
        if restore is not None:
            restore()
    ordered = finish_index(plan, records)
    return Summary(counts["explained"], len(plan.kept), counts["failed"], plan.batch_size, plan.out / INDEX, ordered,
                   time.perf_counter() - t0)


def replica_shares(explainer, memory_budget, replicas: int) -> tuple[int, int]:
    """(memory budget, intra-op threads) of each of `replicas` Explainers: the run's budget
    (`memory_budget`, else the given explainer's, else the default) and its threads
    (ONNXPLAIN_THREADS, else every core) split evenly, at least 1 byte and 1 thread each.
    Independent sessions side by side scale better than one session's intra-op threads."""
    from .runtime import DEFAULT_MEMORY_BUDGET

    env = os.environ.get("ONNXPLAIN_THREADS")
    total = int(env) if env else (os.cpu_count() or 1)
    budget = int(memory_budget or getattr(explainer, "memory_budget", None) or DEFAULT_MEMORY_BUDGET)
    return max(1, budget // replicas), max(1, total // replicas)


def _run_under(explainer, budget: int):
    """Give `explainer` (the caller's, replica 0) its share of the budget for this run: its
    own and that of the sessions it has already built (each reads its budget at every run).
    Returns what restores them."""
    from .runtime import Session

    sessions = []
    cache = getattr(explainer, "_cache", None)
    for value in (cache.values() if cache is not None else ()):
        for v in value if isinstance(value, tuple) else (value,):
            v = v if isinstance(v, Session) else getattr(v, "session", None)
            if isinstance(v, Session):
                sessions.append((v, v.memory_budget))
    own = getattr(explainer, "memory_budget", None)
    explainer.memory_budget = budget
    for v, _ in sessions:
        v.memory_budget = budget

    def restore():
        explainer.memory_budget = own
        for v, old in sessions:
            v.memory_budget = old

    return restore


def _replicated(batches, first, make_replica, replicas: int, plan: Plan, on_error: str, take) -> None:
    """The batches explained by `replicas` threads, each with its own Explainer (`first`,
    then `make_replica()` built in its thread on its first batch, so replicas compile in
    parallel); onnxruntime releases the GIL while it runs. At most `replicas` batches are in
    flight; `take(records, n)` sees each as it finishes (this thread alone writes the index
    and the bar). The first error (an interrupt too) ends the run once the batches in
    flight are done and taken, and is raised as it was raised."""
    tasks: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def work(k):
        replica = first if k == 0 else None
        while True:
            items = tasks.get()
            if items is None:
                return
            try:
                if replica is None:
                    replica = make_replica()
                done.put((items, process_batch(replica, plan, items, on_error), None))
            except BaseException as exc:  # handed to the caller's thread, which raises it
                done.put((items, None, exc))

    pool = [threading.Thread(target=work, args=(k,), name=f"onnxplain-replica-{k}", daemon=True)
            for k in range(replicas)]
    for t in pool:
        t.start()
    error = None
    in_flight = 0

    def collect(block: bool) -> bool:
        nonlocal error, in_flight
        try:
            items, batch_records, exc = done.get() if block else done.get_nowait()
        except queue.Empty:
            return False
        in_flight -= 1
        if exc is not None:
            error = error or exc
        else:
            take(batch_records, len(items))
        return True

    try:
        for items in batches:
            while in_flight >= replicas:
                collect(block=True)
            if error is not None:
                break
            tasks.put(items)
            in_flight += 1
            while collect(block=False):
                pass
            if error is not None:
                break
        while in_flight:
            collect(block=True)
    finally:
        batches.close()  # the decode threads stop
        for _ in pool:
            tasks.put(None)
    if error is not None:
        raise error


def finish_index(plan: Plan, records: dict) -> list:
    """The index of a finished run rewritten in the dataset's order (batches were appended
    as they were done; a resumed run appends after what it kept). Returns the records."""
    ordered = [records[e.id] for e in plan.dataset.entries if e.id in records]
    _write_index(plan.out / INDEX, ordered)
    return ordered


def as_dataset(dataset, explainer, preset=None) -> Dataset:
    """A Dataset with this model's preprocessing (a path or list is opened first)."""
    if not isinstance(dataset, Dataset):
        dataset = open_dataset(dataset)
    if dataset.preprocess is None or preset:
        dataset = dataset.with_preprocess(preprocess_for(explainer, preset) if any(
            e.kind == "image" for e in dataset.entries) else None, input_rank(explainer))
    elif dataset.rank is None:
        dataset = dataset.with_preprocess(dataset.preprocess, input_rank(explainer))
    return dataset


_DONE = object()


def _prefetched(dataset: Dataset, batches, workers: int, prefetch: int):
    """The batches' items, loaded by `workers` threads while the caller explains: at most
    `prefetch` loaded batches wait in the queue (the memory the engine holds)."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                for batch in batches:
                    items = list(pool.map(dataset.load, batch))
                    while not stop.is_set():
                        try:
                            q.put(items, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as exc:  # handed to the consumer, which raises it
            q.put(exc)
            return
        q.put(_DONE)

    thread = threading.Thread(target=produce, name="onnxplain-decode", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
