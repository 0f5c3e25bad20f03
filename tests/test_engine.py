"""The local dataset engine as a specification: results in the dataset's order, each row the
attribution `Explainer.attribute` gives for that input; an interrupted run resumed computes
only what is missing and lists no input twice; batches stay under the memory budget; a
corrupt input is recorded with its error and the run goes on."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from onnxplain import cli
from onnxplain.datasets import open_dataset, preprocess_for
from onnxplain.engine import Progress, explain_dataset, load_results, read_index
from onnxplain.errors import InputError
from onnxplain.explainer import Explainer
from onnxplain.io import prepare_images

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny_cnn.onnx"
N = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def explainer():
    return Explainer(TINY)


class Counting:
    """An Explainer whose attribute calls (the engine's `attribute_scored`) are counted (and
    can be made to fail at call k)."""

    def __init__(self, explainer, fail_at=None):
        self._e, self.calls, self.rows, self.fail_at = explainer, 0, [], fail_at

    def __getattr__(self, name):
        return getattr(self._e, name)

    def attribute_scored(self, x, **kw):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt  # the user's Ctrl-C in the middle of the run
        self.rows.append(len(x))
        return self._e.attribute_scored(x, **kw)


def reference(explainer, paths, method="gradient", target=None, **options):
    x, _ = prepare_images(paths, preprocess_for(explainer))
    return explainer.attribute(x, method=method, target=target, **options)


def test_rows_come_in_dataset_order_each_the_attribution_of_its_input(folder, explainer, tmp_path):
    s = explain_dataset(TINY, folder, tmp_path, batch_size=4, explainer=explainer)
    ids = [f"img{i:02d}.png" for i in range(N)]
    index = read_index(tmp_path / "index.jsonl")
    assert [r["id"] for r in index] == ids == [r["id"] for r in s.records]
    assert s.explained == N and s.failed == 0 and s.batch_size == 4
    assert [r["row"] for r in index] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    got = load_results(tmp_path)
    want = reference(explainer, [folder / i for i in ids])
    for i, name in enumerate(ids):
        np.testing.assert_allclose(got[name], want[i], rtol=1e-5, atol=1e-7)
    logits = explainer.predict(prepare_images([folder / i for i in ids], preprocess_for(explainer))[0])
    assert [r["predicted"] for r in index] == logits.argmax(1).tolist() == [r["target"] for r in index]
    np.testing.assert_allclose([r["score"] for r in index], logits.max(1), rtol=1e-6)
    assert all(r["method"] == "gradient" and r["options"] == {} and len(r["key"]) == 64 for r in index)


def test_a_manifest_target_is_the_class_explained_and_t_overrides_it(folder, explainer, tmp_path):
    (tmp_path / "m.csv").write_text(f"path,target\n{folder / 'img00.png'},2\n{folder / 'img01.png'},\n")
    s = explain_dataset(TINY, tmp_path / "m.csv", tmp_path / "out", explainer=explainer)
    got = load_results(tmp_path / "out")
    pred = int(explainer.predict(prepare_images([folder / "img01.png"], preprocess_for(explainer))[0]).argmax())
    assert [r["target"] for r in s.records] == [2, pred]
    np.testing.assert_allclose(got[str(folder / "img00.png")], reference(explainer, [folder / "img00.png"], target=2)[0],
                               rtol=1e-5, atol=1e-7)
    s = explain_dataset(TINY, tmp_path / "m.csv", tmp_path / "out", target=1, explainer=explainer)
    assert [r["target"] for r in s.records] == [1, 1]


def test_an_interrupted_run_resumed_computes_only_the_rest_and_lists_each_input_once(folder, explainer, tmp_path):
    whole = tmp_path / "whole"
    explain_dataset(TINY, folder, whole, batch_size=2, explainer=explainer)
    broken = Counting(explainer, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(TINY, folder, tmp_path / "run", batch_size=2, explainer=broken)
    assert len(read_index(tmp_path / "run" / "index.jsonl")) == 4  # two batches done before the interrupt
    again = Counting(explainer)
    s = explain_dataset(TINY, folder, tmp_path / "run", batch_size=2, resume=True, explainer=again)
    assert (s.reused, s.explained) == (4, N - 4)
    assert again.calls == 3 and sum(again.rows) == N - 4  # no input explained twice
    index = read_index(tmp_path / "run" / "index.jsonl")
    assert [r["id"] for r in index] == [f"img{i:02d}.png" for i in range(N)]
    a, b = load_results(whole), load_results(tmp_path / "run")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # Resumed once more: nothing left to do.
    idle = Counting(explainer)
    assert explain_dataset(TINY, folder, tmp_path / "run", batch_size=2, resume=True, explainer=idle).reused == N
    assert idle.calls == 0


def test_a_shard_written_before_its_index_lines_is_read_back_not_recomputed(folder, explainer, tmp_path):
    explain_dataset(TINY, folder, tmp_path, batch_size=4, explainer=explainer)
    index = tmp_path / "index.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # the crash cut the next append short
    c = Counting(explainer)
    s = explain_dataset(TINY, folder, tmp_path, batch_size=4, resume=True, explainer=c)
    assert c.calls == 0 and s.reused == 4 and s.explained == N - 4
    assert [r["id"] for r in read_index(index)] == [f"img{i:02d}.png" for i in range(N)]


def test_a_result_with_other_options_is_recomputed_and_the_old_record_dropped(folder, explainer, tmp_path):
    explain_dataset(TINY, folder, tmp_path, method="occlusion", options={"window": "8,8"}, explainer=explainer)
    c = Counting(explainer)
    s = explain_dataset(TINY, folder, tmp_path, method="occlusion", options={"window": "16,16"}, resume=True,
                        explainer=c)
    assert s.reused == 0 and s.explained == N and c.calls >= 1
    index = read_index(tmp_path / "index.jsonl")
    assert len(index) == N and all(r["options"]["window"] == [16, 16] for r in index)
    same = Counting(explainer)
    explain_dataset(TINY, folder, tmp_path, method="occlusion", options={"window": [16, 16]}, resume=True,
                    explainer=same)
    assert same.calls == 0  # the same options spelt otherwise are the same key


def test_batches_stay_under_the_memory_budget(folder, tmp_path):
    e = Explainer(TINY)
    probe = prepare_images([folder / "img00.png"], preprocess_for(e))[0]
    row = e.forward_session(e.feeds(probe), [e.explained_tensor()]).session.row_bytes()
    small = Explainer(TINY, memory_budget=3 * row + row // 2)
    c = Counting(small)
    s = explain_dataset(TINY, folder, tmp_path, batch_size=16, explainer=c)
    assert s.batch_size == 3 and c.rows == [3, 3, 3, 1]
    for shard in {r["shard"] for r in s.records}:
        with np.load(tmp_path / shard) as z:
            assert z["attribution"].shape[0] * row <= small.memory_budget


def test_a_corrupt_input_is_recorded_with_its_error_and_the_run_goes_on(folder, explainer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"img{i}.png").write_bytes((folder / f"img0{i}.png").read_bytes())
    (data / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    s = explain_dataset(TINY, data, tmp_path / "out", batch_size=2, explainer=explainer)
    by_id = {r["id"]: r for r in s.records}
    assert s.failed == 1 and s.explained == 3
    assert by_id["img1.png"]["shard"] is None and "cannot read image" in by_id["img1.png"]["error"]
    assert set(load_results(tmp_path / "out")) == {"img0.png", "img2.png", "img3.png"}
    with pytest.raises(InputError, match="img1.png"):
        explain_dataset(TINY, data, tmp_path / "stop", batch_size=2, on_error="stop", explainer=explainer)


def test_an_input_that_fails_inside_a_batch_is_isolated_and_the_others_explained(explainer, tmp_path):
    a = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    a[2, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", a)
    s = explain_dataset(TINY, tmp_path / "x.npy", tmp_path / "out", batch_size=4, explainer=explainer)
    assert [bool(r.get("error")) for r in s.records] == [False, False, True, False]
    assert "NaN" in s.records[2]["error"]
    np.testing.assert_allclose(load_results(tmp_path / "out")["x.npy:3"], explainer.attribute(a[3:4])[0],
                               rtol=1e-5, atol=1e-7)


def test_float16_halves_the_stored_attributions(folder, explainer, tmp_path):
    s = explain_dataset(TINY, folder, tmp_path, float16=True, explainer=explainer)
    with np.load(tmp_path / s.records[0]["shard"]) as z:
        assert z["attribution"].dtype == np.float16
    assert s.records[0]["key"] != explain_dataset(TINY, folder, tmp_path / "f32", explainer=explainer).records[0]["key"]


def test_the_progress_bar_shows_rate_and_eta_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress(10, stream=stream)
        bar.update(4)
        bar.close()
    assert "4/10" in tty.getvalue() and "inputs/s" in tty.getvalue() and "ETA" in tty.getvalue()
    assert pipe.getvalue() == ""
    quiet = Tty()
    Progress(10, stream=quiet, quiet=True).update(3)
    assert quiet.getvalue() == ""


def test_the_cli_command_explains_a_folder_and_resumes(folder, tmp_path):
    out = tmp_path / "out"
    args = ["explain-dataset", str(TINY), str(folder), "-m", "occlusion", "-O", "window=8,8", "--out", str(out),
            "--batch-size", "4"]
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output
    assert "10 explained" in r.output
    r = CliRunner().invoke(cli.main, args + ["--resume"])
    assert r.exit_code == 0 and "0 explained, 10 kept" in r.output
    assert json.loads((out / "run.json").read_text())["options"]["window"] == [8, 8]
    assert len(open_dataset(folder)) == len(read_index(out / "index.jsonl"))


def test_nothing_in_the_core_imports_ray_and_the_ray_engine_names_its_extra(monkeypatch):
    import subprocess
    import sys

    code = ("import sys, onnxplain, onnxplain.cli, onnxplain.engine, onnxplain.datasets; "
            "print('ray' in sys.modules or 'pyarrow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
    from onnxplain.engine_ray import _ray
    from onnxplain.errors import OptionError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(OptionError, match=r"onnxplain\[ray\]"):
        _ray()


def test_a_grown_dataset_resumed_explains_only_the_new_inputs_and_indexes_in_dataset_order(folder, explainer,
                                                                                            tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in (0, 2, 4):
        (data / f"img{i}.png").write_bytes((folder / f"img0{i}.png").read_bytes())
    explain_dataset(TINY, data, tmp_path / "out", batch_size=2, explainer=explainer)
    for i in (1, 3):
        (data / f"img{i}.png").write_bytes((folder / f"img0{i}.png").read_bytes())
    c = Counting(explainer)
    s = explain_dataset(TINY, data, tmp_path / "out", batch_size=2, resume=True, explainer=c)
    assert (s.reused, s.explained, c.rows) == (3, 2, [2])
    assert [r["id"] for r in read_index(tmp_path / "out" / "index.jsonl")] == [f"img{i}.png" for i in range(5)]


def test_without_scores_no_forward_pass_is_added_and_the_attributions_are_the_same(folder, explainer, tmp_path):
    class NoPredict(Counting):
        def predict(self, *a, **k):
            raise AssertionError("no forward pass of its own is run without scores")

    with_scores = explain_dataset(TINY, folder, tmp_path / "a", batch_size=4, explainer=explainer)
    s = explain_dataset(TINY, folder, tmp_path / "b", batch_size=4, explainer=NoPredict(explainer), scores=False)
    assert all(r["predicted"] is None and r["score"] is None for r in s.records)
    a, b = load_results(tmp_path / "a"), load_results(tmp_path / "b")
    assert all(np.allclose(a[k], b[k], rtol=1e-6, atol=1e-8) for k in a)
    assert with_scores.records[0]["key"] != s.records[0]["key"]


def test_a_shard_write_cut_short_leaves_no_file_behind_after_the_next_run(folder, explainer, tmp_path):
    explain_dataset(TINY, folder, tmp_path, batch_size=4, explainer=explainer)
    (tmp_path / ".shard-0123.npz.77.88.tmp").write_bytes(b"half a shard")
    explain_dataset(TINY, folder, tmp_path, batch_size=4, resume=True, explainer=explainer)
    assert not list(tmp_path.glob(".*.tmp"))


def test_with_scores_a_single_pass_method_runs_the_model_once_a_batch(folder, explainer, tmp_path, monkeypatch):
    """The predicted class and score come out of the run that explains them (the compiled
    explainer's forward half): one onnxruntime run a batch, not a forward pass and then the
    explainer; the records equal a separate forward pass's."""
    from onnxplain import runtime

    class NoPredict(Counting):
        def predict(self, *a, **k):
            raise AssertionError("the scores come from the explaining run")

    paths = [folder / f"img{i:02d}.png" for i in range(N)]
    logits = explainer.predict(prepare_images(paths, preprocess_for(explainer))[0])
    explain_dataset(TINY, folder, tmp_path / "warm", batch_size=4, explainer=explainer)  # sessions compiled
    runs = []
    real = runtime.Session.run
    monkeypatch.setattr(runtime.Session, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    for method in ("gradient", "lrp.epsilon"):
        runs.clear()
        s = explain_dataset(TINY, folder, tmp_path / method, batch_size=4, method=method,
                            explainer=NoPredict(explainer))
        assert len(runs) == 3  # batches of 4, 4, 2
        assert [r["predicted"] for r in s.records] == logits.argmax(1).tolist() == [r["target"] for r in s.records]
        np.testing.assert_allclose([r["score"] for r in s.records], logits.max(1), rtol=1e-6)
        want = reference(explainer, paths, method=method)
        got = load_results(tmp_path / method)
        for i, p in enumerate(paths):
            np.testing.assert_allclose(got[p.name], want[i], rtol=1e-5, atol=1e-7)
    # Targets the dataset gives: their scores come from the same run.
    (tmp_path / "m.csv").write_text("path,target\n" + "".join(f"{p},{i % 3}\n" for i, p in enumerate(paths[:4])))
    runs.clear()
    s = explain_dataset(TINY, tmp_path / "m.csv", tmp_path / "m", batch_size=4, explainer=NoPredict(explainer))
    assert len(runs) == 1
    assert [r["target"] for r in s.records] == [0, 1, 2, 0]
    np.testing.assert_allclose([r["score"] for r in s.records], logits[np.arange(4), [0, 1, 2, 0]], rtol=1e-6)


def test_with_scores_a_multi_pass_method_reads_them_off_the_pass_that_found_the_class(folder, explainer, tmp_path):
    class NoPredict(Counting):
        def predict(self, *a, **k):
            raise AssertionError("the forward pass that found the predicted class gives the scores")

    paths = [folder / f"img{i:02d}.png" for i in range(N)]
    logits = explainer.predict(prepare_images(paths, preprocess_for(explainer))[0])
    s = explain_dataset(TINY, folder, tmp_path / "ig", batch_size=4, method="integrated_gradients",
                        options={"n_steps": 4}, explainer=NoPredict(explainer))
    assert [r["predicted"] for r in s.records] == logits.argmax(1).tolist() == [r["target"] for r in s.records]
    np.testing.assert_allclose([r["score"] for r in s.records], logits.max(1), rtol=1e-6)
    # Given targets: a method that never runs the unperturbed input alone needs the forward pass.
    s = explain_dataset(TINY, folder, tmp_path / "ig3", batch_size=4, method="integrated_gradients", target=3,
                        options={"n_steps": 4}, explainer=explainer)
    np.testing.assert_allclose([r["score"] for r in s.records], logits[:, 3], rtol=1e-6)
