"""`--engine ray` as a specification, on a local Ray cluster: the same records and the same
attribution bytes as the local engine for the same batch size and threads; an actor killed
mid-run loses and duplicates nothing; a run interrupted on one engine resumes on Ray,
computing only the rest; a corrupt file is recorded and does not stop the run."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxplain.engine import explain_dataset, load_results, read_index
from onnxplain.explainer import Explainer

ray = pytest.importorskip("ray")
from onnxplain.engine_ray import CRASH_ENV, explain_dataset_ray  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny_cnn.onnx"
N = 64


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # One cluster for the module: starting one costs seconds.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # The local engine with the actors' one intra-op thread: the same arithmetic.
    monkeypatch.setenv("ONNXPLAIN_THREADS", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos64")
    rng = np.random.default_rng(7)
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"p{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def local(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    os.environ["ONNXPLAIN_THREADS"] = "1"
    try:
        explain_dataset(TINY, folder, out, batch_size=8, quiet=True)
    finally:
        del os.environ["ONNXPLAIN_THREADS"]
    return out


def same_results(a, b):
    ra, rb = load_results(a), load_results(b)
    return sorted(ra) == sorted(rb) and all(ra[k].tobytes() == rb[k].tobytes() for k in ra)


def test_ray_gives_the_local_engines_records_and_bytes(folder, local, tmp_path):
    s = explain_dataset_ray(TINY, folder, tmp_path, batch_size=8, workers=2, quiet=True)
    assert s.explained == N and s.failed == 0
    assert (tmp_path / "index.jsonl").read_text() == (local / "index.jsonl").read_text()
    assert same_results(local, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("shard-*.npz")) == sorted(p.name for p in local.glob("shard-*.npz"))


def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(folder, local, tmp_path):
    marker = tmp_path / "killed"
    s = explain_dataset_ray(TINY, folder, tmp_path / "out", batch_size=8, workers=2, quiet=True,
                            ray_remote_args={"runtime_env": {"env_vars": {CRASH_ENV: str(marker)}}})
    assert marker.is_file()  # an actor did exit after writing a shard, before answering
    index = read_index(tmp_path / "out" / "index.jsonl")
    assert [r["id"] for r in index] == [f"p{i:02d}.png" for i in range(N)] and s.explained == N
    assert len(list((tmp_path / "out").glob("shard-*.npz"))) == N // 8
    assert not list((tmp_path / "out").glob(".*.tmp"))
    assert same_results(local, tmp_path / "out")


def test_a_run_interrupted_locally_resumes_on_ray_and_a_corrupt_file_is_recorded(folder, local, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(folder.iterdir()):
        (data / p.name).write_bytes(p.read_bytes())
    (data / "p99.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    e = Explainer(TINY)
    calls = []

    def interrupted(x, **kw):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return Explainer.attribute_scored(e, x, **kw)

    e.attribute_scored = interrupted
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(TINY, data, tmp_path / "out", batch_size=8, explainer=e, quiet=True)
    s = explain_dataset_ray(TINY, data, tmp_path / "out", batch_size=8, workers=2, resume=True, quiet=True)
    assert (s.reused, s.explained, s.failed) == (16, N - 16, 1)
    index = read_index(tmp_path / "out" / "index.jsonl")
    assert [r["id"] for r in index] == [f"p{i:02d}.png" for i in range(N)] + ["p99.png"]
    assert "cannot read image" in index[-1]["error"]
    assert same_results(local, tmp_path / "out")


def test_on_error_stop_ends_a_ray_run_with_the_inputs_own_error(folder, tmp_path):
    from onnxplain.errors import InputError

    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(folder.iterdir())[:4]:
        (data / p.name).write_bytes(p.read_bytes())
    (data / "q.png").write_bytes(b"not a picture")
    with pytest.raises(InputError, match="q.png"):
        explain_dataset_ray(TINY, data, tmp_path / "out", batch_size=4, workers=1, on_error="stop", quiet=True)
    assert [r["id"] for r in read_index(tmp_path / "out" / "index.jsonl")] == [f"p{i:02d}.png" for i in range(4)]
