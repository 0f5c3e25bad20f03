"""One reader for every command: `explain`, `evaluate`, `validate` and `report` take the same
inputs (`onnxplain.datasets`: a folder, a glob, a CSV/JSONL manifest whose target column is
the target where -t gives none, a .npy/.npz shard), say per sample what they explained with
its score (--json, the dataset engine's index record), name explain's files after the
inputs, and stop on a bad input with exit 2 and one clear line."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

import onnxplain
from onnxplain import Explainer, cli

MODELS = Path(__file__).resolve().parent.parent / "models"
TINY = MODELS / "tiny_cnn.onnx"
COMMANDS = ("explain", "evaluate", "validate", "report")
SOURCES = ("folder", "glob", "manifest", "shard")


def run(*args):
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r


def logits(x) -> np.ndarray:
    """The model's scores by plain onnxruntime: the reference every explained score is held to."""
    return ort.InferenceSession(str(TINY), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    img = Image.open(MODELS / "chelsea.png").resize((64, 48))
    img.save(photos / "cat.png")
    img.transpose(Image.FLIP_LEFT_RIGHT).save(photos / "tac.png")
    img.rotate(90, expand=True).save(photos / "sub" / "other.jpg")
    # A manifest: a target for the cat, none for the flipped cat (its predicted class).
    (photos / "labels.csv").write_text("path,target\ncat.png,3\ntac.png,\n")
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    np.savez(root / "shard.npz", x)
    return {"root": root, "photos": photos, "x": x,
            "folder": photos, "glob": str(photos / "*.png"), "manifest": photos / "labels.csv",
            "shard": root / "shard.npz"}


# What each source holds: (id, name, file, row) per sample, in order.
def expected(data, source):
    p = data["photos"]
    if source == "folder":
        return [("cat.png", "cat", p / "cat.png"), ("sub/other.jpg", "other", p / "sub" / "other.jpg"),
                ("tac.png", "tac", p / "tac.png")]
    if source in ("glob", "manifest"):
        return [("cat.png", "cat", p / "cat.png"), ("tac.png", "tac", p / "tac.png")]
    return [(f"shard.npz:{i}", f"shard_{i}", data["shard"]) for i in range(3)]


def model_inputs(data, source) -> np.ndarray:
    if source == "shard":
        return data["x"]
    x, _ = onnxplain.load_image([str(f) for _, _, f in expected(data, source)], TINY)
    return x


def manifest_targets(data, source, x):
    """The target of each sample: the manifest's column, else the predicted class."""
    predicted = logits(x).argmax(axis=1)
    if source == "manifest":
        return [3, int(predicted[1])]
    return [int(c) for c in predicted]


def invoke(command, data, source, tmp_path, *extra):
    src = data[source]
    if command == "explain":
        return run("explain", TINY, src, "-o", str(tmp_path / "out") + "/", "--format", "npy", "--json", *extra)
    if command == "evaluate":
        return run("evaluate", TINY, src, "--methods", "gradient", "--metrics", "deletion", "-S", "deletion:steps=3",
                   "-o", tmp_path / "e.json", "-q", "--json", *extra)
    if command == "validate":
        return run("validate", TINY, TINY, src, "-m", "gradient", "--report", tmp_path / "v.json", "-q", "--json",
                   *extra)
    return run("report", TINY, src, "--methods", "gradient", "--metrics", "none", "-o", tmp_path / "r.html", "-q",
               "--json", *extra)


def per_sample(command, printed) -> list[dict]:
    """Each command's per-sample results from its --json."""
    if command == "explain":
        return printed
    return printed["samples"]


# ----------------------------------------------------------------------------- every command, every source


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reads_every_source_and_prints_each_samples_target_and_explained_score(command, source, data,
                                                                                            tmp_path):
    r = invoke(command, data, source, tmp_path)
    assert r.exit_code == 0, r.output
    samples = per_sample(command, json.loads(r.stdout))
    want = expected(data, source)
    assert [s["id"] for s in samples] == [i for i, _, _ in want]
    assert [Path(s["input"]) for s in samples] == [f for _, _, f in want]
    x = model_inputs(data, source)
    targets = manifest_targets(data, source, x)
    assert [s["target"] for s in samples] == targets
    score = "reference_score" if command == "validate" else "score"
    reference = logits(x)[np.arange(len(x)), targets]
    np.testing.assert_allclose([s[score] for s in samples], reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", SOURCES)
def test_explain_writes_one_file_per_input_named_after_it_equal_to_the_api(source, data, tmp_path):
    r = invoke("explain", data, source, tmp_path)
    assert r.exit_code == 0, r.output
    records = json.loads(r.stdout)
    want = expected(data, source)
    names = [("sub/" if i.startswith("sub/") else "") + n for i, n, _ in want]
    assert [Path(rec["file"]).relative_to(tmp_path / "out").as_posix() for rec in records] == \
        [f"{n}.gradient.npy" for n in names]
    x = model_inputs(data, source)
    targets = manifest_targets(data, source, x)
    api = Explainer(TINY).attribute(x, method="gradient", target=targets)
    for i, rec in enumerate(records):
        np.testing.assert_allclose(np.load(rec["file"]), api[i:i + 1], rtol=1e-5, atol=1e-9)


def test_explain_pictures_of_a_folder_mirror_its_subfolders(data, tmp_path):
    r = run("explain", TINY, data["folder"], "-o", str(tmp_path / "pics") + "/", "--plain", "-q")
    assert r.exit_code == 0, r.output
    files = sorted(p.relative_to(tmp_path / "pics").as_posix() for p in (tmp_path / "pics").rglob("*.png"))
    assert files == ["cat.gradient.png", "sub/other.gradient.png", "tac.gradient.png"]


def test_array_rows_of_a_manifest_are_named_by_its_id_or_by_file_and_row(data, tmp_path):
    m = data["root"] / "rows.jsonl"
    m.write_text(json.dumps({"path": "shard.npz", "row": 2, "id": "third", "target": 1}) + "\n"
                 + json.dumps({"path": "shard.npz", "row": 0}) + "\n")
    r = run("explain", TINY, m, "-o", str(tmp_path / "rows") + "/", "--json")
    assert r.exit_code == 0, r.output
    records = json.loads(r.stdout)
    assert [Path(rec["file"]).name for rec in records] == ["third.gradient.npy", "shard_0.gradient.npy"]
    assert records[0]["target"] == 1
    x = data["x"][[2, 0]]
    api = Explainer(TINY).attribute(x, method="gradient", target=[1, int(logits(x[1:]).argmax())])
    np.testing.assert_allclose(np.load(records[0]["file"]), api[:1], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.load(records[1]["file"]), api[1:], rtol=1e-5, atol=1e-9)


def test_explain_json_record_is_the_dataset_engines_index_record(data, tmp_path):
    from onnxplain.engine import explain_dataset

    opts = ("-m", "integrated_gradients", "-O", "n_steps=4")
    r = run("explain", TINY, data["manifest"], *opts, "-o", str(tmp_path / "o") + "/", "--format", "npy", "--json")
    assert r.exit_code == 0, r.output
    summary = explain_dataset(TINY, data["manifest"], tmp_path / "engine", method="integrated_gradients",
                              options={"n_steps": "4"}, quiet=True)
    shared = ("id", "input", "target", "predicted", "score", "method", "options")
    printed = [{k: rec[k] for k in shared} for rec in json.loads(r.stdout)]
    indexed = [{k: rec[k] for k in shared} for rec in summary.records]
    for a, b in zip(printed, indexed):
        assert a.pop("score") == pytest.approx(b.pop("score"), rel=1e-6)
    assert printed == indexed and printed[0]["options"]["n_steps"] == 4


def test_explain_takes_several_sources_at_once(data, tmp_path):
    r = run("explain", TINY, data["photos"] / "cat.png", data["photos"] / "sub", "--json",
            "-o", str(tmp_path / "both") + "/", "-t", "3")
    assert r.exit_code == 0, r.output
    records = json.loads(r.stdout)
    assert [Path(rec["input"]).name for rec in records] == ["cat.png", "other.jpg"]
    assert len({rec["id"] for rec in records}) == 2
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["cat.gradient.png", "other.gradient.png"]


def test_evaluate_scores_the_manifests_target_not_the_prediction(data, tmp_path):
    from onnxplain import metrics

    r = invoke("evaluate", data, "manifest", tmp_path)
    assert r.exit_code == 0, r.output
    records = json.loads((tmp_path / "e.json").read_text())["records"]
    x = model_inputs(data, "manifest")
    targets = manifest_targets(data, "manifest", x)
    e = Explainer(TINY)
    for i, rec in enumerate(records):  # one record per input file
        want = metrics.evaluate(e, x[i:i + 1], {"gradient": {}}, ["deletion"], target=[targets[i]],
                                settings={"deletion": {"steps": 3}})
        assert rec["metrics"]["gradient"]["deletion"] == pytest.approx(want["gradient"]["deletion"].values.tolist())


def test_evaluate_resumes_a_shard_row_by_row_ids_with_nothing_recomputed(data, tmp_path, monkeypatch):
    from onnxplain import metrics

    first = invoke("evaluate", data, "shard", tmp_path)
    assert first.exit_code == 0, first.output
    calls = []
    original = metrics.evaluate
    monkeypatch.setattr(metrics, "evaluate", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = invoke("evaluate", data, "shard", tmp_path, "--resume")
    assert again.exit_code == 0 and calls == []
    assert json.loads(again.stdout)["table"] == json.loads(first.stdout)["table"]


def test_validate_expectations_use_the_manifests_target(data, tmp_path):
    r = run("validate", TINY, data["manifest"], "-m", "gradient", "--expect", "region=0,0,32,32;min_share=0.99",
            "--json", "-q")
    assert r.exit_code == 0, r.output
    checks = json.loads(r.stdout)["checks"]
    x = model_inputs(data, "manifest")
    assert [c["target"] for c in checks] == manifest_targets(data, "manifest", x)
    assert [c["id"] for c in checks] == ["cat.png", "tac.png"]


def test_report_shows_every_input_of_a_folder_with_its_explained_class(data, tmp_path):
    r = invoke("report", data, "folder", tmp_path)
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    assert len(printed["inputs"]) == 3 and printed["inputs"][0].startswith("cat")
    page = (tmp_path / "r.html").read_text()
    assert page.count("<img alt='gradient on ") == 3


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def bad(data):
    root = data["root"]
    (root / "gone.csv").write_text("path,target\nphotos/cat.png,3\nphotos/missing.png,1\n")
    broken = root / "broken"
    broken.mkdir()
    Image.open(data["photos"] / "cat.png").save(broken / "a.png")
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return {"missing": root / "gone.csv", "corrupt": broken}


@pytest.mark.parametrize("case, words", [("missing", ("not found", "missing.png", "gone.csv")),
                                         ("corrupt", ("cannot read image", "b.png"))])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_or_corrupt_input_is_exit_2_with_one_line_naming_it(command, case, words, data, bad, tmp_path):
    r = invoke(command, {**data, case: bad[case]}, case, tmp_path)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("command", ("evaluate", "validate"))
def test_a_missing_file_of_a_manifest_stops_before_any_work(command, data, bad, tmp_path):
    r = invoke(command, {**data, "missing": bad["missing"]}, "missing", tmp_path)
    assert r.exit_code == 2
    assert not (tmp_path / "e.jsonl").exists() and not (tmp_path / "v.jsonl").exists()
