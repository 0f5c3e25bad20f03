"""Replicas of the local dataset engine as a specification: N Explainers explain N batches at
once and the output folder is the one a single replica writes (the same attributions to the
bit, the same records, in the dataset's order); each replica gets its share of the threads
and of the memory budget; an interrupted replicated run resumes; a corrupt input is recorded
(skip) or ends the run (stop) as with one replica."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from onnxplain import cli, engine, runtime
from onnxplain.datasets import open_dataset, preprocess_for
from onnxplain.engine import explain_dataset, load_results, read_index, replica_shares
from onnxplain.errors import InputError, OptionError
from onnxplain.explainer import Explainer
from onnxplain.io import prepare_images

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny_cnn.onnx"
N = 10
IDS = [f"img{i:02d}.png" for i in range(N)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def watch_batches(monkeypatch, delay=None):
    """Records (thread, explainer, rows) of every batch the engine explains and the most
    batches explained at once; `delay(first_row_id)` seconds are slept inside a batch."""
    seen = {"calls": [], "busy": 0, "most": 0, "finished": []}
    lock = threading.Lock()
    real = engine.explain_batch

    def explain_batch(explainer, items, job):
        with lock:
            seen["busy"] += 1
            seen["most"] = max(seen["most"], seen["busy"])
            seen["calls"].append((threading.current_thread().name, id(explainer), len(items)))
        try:
            if delay:
                time.sleep(delay(items[0].id))
            return real(explainer, items, job)
        finally:
            with lock:
                seen["busy"] -= 1
                seen["finished"].append(items[0].id)

    monkeypatch.setattr(engine, "explain_batch", explain_batch)
    return seen


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in records]


@pytest.mark.parametrize("method,options", [("gradient", {}), ("occlusion", {"window": "8,8"}),
                                            ("smoothgrad", {"n_samples": 3, "seed": 7})])
def test_two_replicas_write_the_bits_and_records_of_one(folder, tmp_path, monkeypatch, method, options):
    # One intra-op thread a session in both runs: onnxruntime's sums may be split by thread.
    monkeypatch.setenv("ONNXPLAIN_THREADS", "1")
    one = explain_dataset(TINY, folder, tmp_path / "one", method=method, options=options, batch_size=3)
    monkeypatch.setenv("ONNXPLAIN_THREADS", "2")
    seen = watch_batches(monkeypatch)
    two = explain_dataset(TINY, folder, tmp_path / "two", method=method, options=options, batch_size=3, replicas=2)
    assert (two.explained, two.failed, two.batch_size) == (N, 0, 3) == (one.explained, one.failed, one.batch_size)
    assert sorted(n for _, _, n in seen["calls"]) == [1, 3, 3, 3]
    a, b = load_results(tmp_path / "one"), load_results(tmp_path / "two")
    assert sorted(a) == sorted(b) == IDS
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    assert without_timing(read_index(tmp_path / "one" / "index.jsonl")) == \
        without_timing(read_index(tmp_path / "two" / "index.jsonl")) == without_timing(two.records)


def test_batches_are_spread_over_the_replicas_at_most_one_each_at_a_time(folder, tmp_path, monkeypatch):
    # The first batch waits for a second one to be explained beside it: the pool must hand
    # it to the other replica (a pool that ran one batch at a time would break the barrier).
    both = threading.Barrier(2, timeout=10)
    first_two = iter([True, True])

    def delay(first):
        if next(first_two, False):
            both.wait()
        return 0.0

    seen = watch_batches(monkeypatch, delay=delay)
    s = explain_dataset(TINY, folder, tmp_path, batch_size=2, replicas=2)
    assert s.explained == N
    threads = {t for t, _, _ in seen["calls"]}
    explainers = {e for _, e, _ in seen["calls"]}
    assert threads == {"onnxplain-replica-0", "onnxplain-replica-1"} and len(explainers) == 2
    assert seen["most"] == 2  # two at once, never more
    by_thread = {}
    for t, e, _ in seen["calls"]:
        by_thread.setdefault(t, set()).add(e)
    assert all(len(v) == 1 for v in by_thread.values())  # an Explainer stays in its thread


def test_batches_finishing_out_of_order_are_indexed_in_dataset_order(folder, tmp_path, monkeypatch):
    # The first batch is the slowest: the second (and later ones) finish before it.
    seen = watch_batches(monkeypatch, delay=lambda first: 0.4 if first == "img00.png" else 0.0)
    s = explain_dataset(TINY, folder, tmp_path, batch_size=2, replicas=2)
    assert seen["finished"][0] != "img00.png"
    index = read_index(tmp_path / "index.jsonl")
    assert [r["id"] for r in index] == [r["id"] for r in s.records] == IDS
    assert [r["row"] for r in index] == [0, 1] * 5


def test_an_interrupted_replicated_run_resumed_explains_only_the_rest(folder, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    explain_dataset(TINY, folder, whole, batch_size=2)
    calls, lock = [], threading.Lock()
    real = engine.explain_batch

    def interrupted(explainer, items, job):
        with lock:
            calls.append(len(items))
            k = len(calls)
        if k == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, inside a replica's batch
        return real(explainer, items, job)

    monkeypatch.setattr(engine, "explain_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(TINY, folder, tmp_path / "run", batch_size=2, replicas=2)
    monkeypatch.setattr(engine, "explain_batch", real)
    done = read_index(tmp_path / "run" / "index.jsonl")
    # The two batches before the interrupt, and one the other replica had begun, are indexed.
    assert len(done) in (4, 6) and len({r["id"] for r in done}) == len(done)
    seen = watch_batches(monkeypatch)
    s = explain_dataset(TINY, folder, tmp_path / "run", batch_size=2, resume=True, replicas=2)
    assert s.reused == len(done) and s.explained == N - len(done)
    assert sum(n for _, _, n in seen["calls"]) == N - len(done)  # nothing explained twice
    index = read_index(tmp_path / "run" / "index.jsonl")
    assert [r["id"] for r in index] == IDS
    a, b = load_results(whole), load_results(tmp_path / "run")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_interrupt_in_the_callers_thread_leaves_a_resumable_replicated_run(folder, tmp_path, monkeypatch):
    appended = []
    real = engine._Index.append

    def append(self, records):
        if len(appended) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the engine writes the index
        appended.append(len(records))
        real(self, records)

    monkeypatch.setattr(engine._Index, "append", append)
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(TINY, folder, tmp_path, batch_size=2, replicas=2)
    monkeypatch.setattr(engine._Index, "append", real)
    assert len(read_index(tmp_path / "index.jsonl")) == 4
    seen = watch_batches(monkeypatch)
    s = explain_dataset(TINY, folder, tmp_path, batch_size=2, resume=True, replicas=2)
    assert (s.reused, s.explained, s.failed) == (4, N - 4, 0)
    # Shards the replicas wrote after the interrupt, before their index lines, are read back.
    assert sum(n for _, _, n in seen["calls"]) <= N - 4
    assert [r["id"] for r in read_index(tmp_path / "index.jsonl")] == IDS
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_progress_bar_counts_every_input_once_with_replicas(folder, tmp_path, monkeypatch):
    counted = []

    class Bar(engine.Progress):
        def update(self, n):
            counted.append(n)

    monkeypatch.setattr(engine, "Progress", Bar)
    explain_dataset(TINY, folder, tmp_path, batch_size=3, replicas=3)
    assert sorted(counted) == [1, 3, 3, 3]


def test_with_replicas_a_corrupt_input_is_recorded_on_skip_and_ends_the_run_on_stop(folder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"img{i}.png").write_bytes((folder / f"img0{i}.png").read_bytes())
    (data / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    s = explain_dataset(TINY, data, tmp_path / "skip", batch_size=2, replicas=2)
    by_id = {r["id"]: r for r in s.records}
    assert (s.failed, s.explained) == (1, 5)
    assert by_id["img3.png"]["shard"] is None and "cannot read image" in by_id["img3.png"]["error"]
    assert set(load_results(tmp_path / "skip")) == {f"img{i}.png" for i in (0, 1, 2, 4, 5)}
    with pytest.raises(InputError, match=r"input img3\.png: .*cannot read image"):
        explain_dataset(TINY, data, tmp_path / "stop", batch_size=2, on_error="stop", replicas=2)
    # What finished before the run stopped is indexed and resumable; the bad input is not.
    kept = {r["id"] for r in read_index(tmp_path / "stop" / "index.jsonl")}
    assert "img3.png" not in kept and kept <= {f"img{i}.png" for i in (0, 1, 2, 4, 5)}


def test_each_replica_gets_its_share_of_the_memory_budget_and_of_the_threads(folder, tmp_path, monkeypatch):
    e = Explainer(TINY)
    probe = prepare_images([folder / "img00.png"], preprocess_for(e))[0]
    row = e.forward_session(e.feeds(probe), [e.explained_tensor()]).session.row_bytes()
    budget = 7 * row + row // 2  # 3.75 rows a replica
    made = []
    real = runtime.Session.__init__

    def init(self, model, providers=None, memory_budget=None, threads=None):
        made.append((memory_budget, threads))
        real(self, model, providers, memory_budget, threads)

    monkeypatch.setattr(runtime.Session, "__init__", init)
    monkeypatch.setenv("ONNXPLAIN_THREADS", "4")
    seen = watch_batches(monkeypatch)
    s = explain_dataset(TINY, folder, tmp_path / "given", batch_size=16, memory_budget=budget, replicas=2,
                        method="occlusion", options={"window": "8,8"})
    assert s.batch_size == 3 and sorted(n for _, _, n in seen["calls"]) == [1, 3, 3, 3]
    assert made and set(made) == {(budget // 2, 2)}
    for shard in {r["shard"] for r in s.records}:
        with np.load(tmp_path / "given" / shard) as z:
            assert z["attribution"].shape[0] * row <= budget // 2
    # A given explainer's budget is the run's: the batches are planned for its share, and
    # it runs (with the sessions it had built before) under that share, restored after.
    given = Explainer(TINY, memory_budget=budget)
    given.attribute(probe, method="occlusion", window="8,8")
    built = [v for v in given._cache.values() if isinstance(v, runtime.Session)]
    assert built and {v.memory_budget for v in built} == {budget}
    budgets = []
    rows_per_run = runtime.Session.rows_per_run
    monkeypatch.setattr(runtime.Session, "rows_per_run",
                        lambda self, cap=None: budgets.append(self.memory_budget) or rows_per_run(self, cap))
    s = explain_dataset(TINY, folder, tmp_path / "explainer", batch_size=16, replicas=2, explainer=given,
                        method="occlusion", options={"window": "8,8"})
    assert s.batch_size == 3 and budgets and set(budgets) == {budget // 2}
    assert given.memory_budget == budget and {v.memory_budget for v in built} == {budget}
    assert replica_shares(None, budget, 3) == (budget // 3, 1)
    monkeypatch.delenv("ONNXPLAIN_THREADS")
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 16)
    assert replica_shares(None, 100, 4) == (25, 4) and replica_shares(None, 100, 32) == (3, 1)


def test_an_explicit_thread_count_sets_every_session_and_wins_over_the_env(folder, monkeypatch):
    monkeypatch.setenv("ONNXPLAIN_THREADS", "2")
    x = prepare_images([folder / "img00.png"], preprocess_for(Explainer(TINY)))[0]
    for threads, want in ((1, 1), (None, 2)):
        e = Explainer(TINY, threads=threads)
        e.attribute(x)
        sessions = [v for v in e._cache.values() if isinstance(v, runtime.Session)] + \
            [v[1] for v in e._cache.values() if isinstance(v, tuple) and isinstance(v[1], runtime.Session)]
        assert sessions and {s.session.get_session_options().intra_op_num_threads for s in sessions} == {want}
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(OptionError, match="threads must be a positive integer"):
            Explainer(TINY, threads=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_replica_count_that_is_not_a_positive_integer_is_refused(folder, tmp_path, bad):
    with pytest.raises(OptionError, match="replicas must be a positive integer"):
        explain_dataset(TINY, folder, tmp_path, replicas=bad)


def test_the_cli_runs_replicas_and_refuses_a_bad_count(folder, tmp_path):
    out = tmp_path / "out"
    args = ["explain-dataset", str(TINY), str(folder), "--out", str(out), "--batch-size", "3"]
    r = CliRunner().invoke(cli.main, args + ["--replicas", "2"])
    assert r.exit_code == 0, r.output
    assert "10 explained" in r.output
    assert [x["id"] for x in read_index(out / "index.jsonl")] == [e.id for e in open_dataset(folder).entries]
    for bad in ("0", "-1", "x"):
        r = CliRunner().invoke(cli.main, args + ["--replicas", bad])
        assert r.exit_code == 2 and "--replicas" in r.output and bad in r.output, r.output
    r = CliRunner().invoke(cli.main, args + ["--engine", "ray", "--replicas", "2"])
    assert r.exit_code == 2 and "--replicas is for the local engine" in r.output, r.output


def test_a_list_of_explainers_is_the_replicas_reused_as_they_are(folder, tmp_path, monkeypatch):
    """Warm replicas (sessions compiled by an earlier run) are handed in as a list and used
    as given: each explains batches in its own thread, and the results are those of one."""
    monkeypatch.setenv("ONNXPLAIN_THREADS", "1")
    one = explain_dataset(TINY, folder, tmp_path / "one", batch_size=3)
    pair = [Explainer(TINY, threads=1), Explainer(TINY, threads=1)]
    seen = watch_batches(monkeypatch)
    two = explain_dataset(TINY, folder, tmp_path / "two", batch_size=3, explainer=pair)
    assert {e for _, e, _ in seen["calls"]} == {id(e) for e in pair}
    a, b = load_results(tmp_path / "one"), load_results(tmp_path / "two")
    assert all(np.array_equal(a[k], b[k]) for k in a) and sorted(b) == IDS
    assert without_timing(one.records) == without_timing(two.records)
    assert all(e.memory_budget is None for e in pair)  # the caller's, untouched (no share imposed)
    with pytest.raises(OptionError, match="2 explainers is 2 replicas"):
        explain_dataset(TINY, folder, tmp_path / "bad", explainer=pair, replicas=3)
