"""The command line as a user and a script see it: results, files, exit codes, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxplain import Explainer, cli

MODELS = Path(__file__).resolve().parent.parent / "models"
TINY = MODELS / "tiny_cnn.onnx"
SCRIPT = Path(sys.executable).parent / "onnxplain"


def run(*args, env=None):
    result = CliRunner().invoke(cli.main, [str(a) for a in args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """Gemm-Relu-Gemm on 12 features, 5 classes: needs only the first rules written."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        initializer=[numpy_helper.from_array(rng.normal(size=(12, 16)).astype(np.float32), "W1"),
                     numpy_helper.from_array(rng.normal(size=(16, 5)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(model, str(path))
    return path


def sample(tmp_path, model, batch=2, name="x.npy"):
    (dims,) = Explainer(model).inputs.values()
    shape = [d if isinstance(d, int) else batch for d in dims]
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    np.save(tmp_path / name, x)
    return tmp_path / name, x


def photo(tmp_path, name="photo.png", size=(50, 40)):
    pixels = np.random.default_rng(2).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / name)
    return tmp_path / name


# ----------------------------------------------------------------------------- methods, inspect


def test_methods_lists_gradient_and_integrated_gradients_with_their_defaults():
    result = run("methods")
    assert result.exit_code == 0
    blocks = {}
    for line in result.stdout.splitlines():
        if line[:1].strip():
            name = line.split()[0]
        blocks[name] = blocks.get(name, "") + line
    assert "gradient" in blocks and "n_steps=50" in blocks["integrated_gradients"]
    listed = {m["name"]: m for m in json.loads(run("methods", "--json").stdout)}
    options = {o["name"]: o["default"] for o in listed["integrated_gradients"]["options"]}
    assert options["n_steps"] == 50 and "gradient" in listed


def test_inspect_shows_inputs_layers_with_shapes_and_missing_rules():
    result = run("inspect", TINY)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "input" in out and "(batch, 3, 32, 32)" in out and "(batch, 10)" in out
    assert "/relu1/Relu_output_0" in out and "(batch, 8, 32, 32)" in out and "MaxPool" in out
    report = json.loads(run("inspect", TINY, "--json").stdout)
    layers = {r["tensor"]: r for r in report["layers"]}
    assert layers["/pool/MaxPool_output_0"]["shape"] == ["batch", 8, 16, 16]
    assert {"gradient", "guided_backprop", "deconvnet"} <= set(report["unsupported"])
    assert report["inputs"][0]["dtype"] == "float32" and report["opset"] >= 17


def test_every_layer_inspect_lists_is_accepted_by_explain_as_layer(mlp, tmp_path):
    x_path, _ = sample(tmp_path, mlp)
    for layer in json.loads(run("inspect", mlp, "--json").stdout)["layers"]:
        result = run("explain", mlp, x_path, "--layer", layer["tensor"], "-o", tmp_path / "a.npy")
        assert result.exit_code == 0, result.stderr


# ----------------------------------------------------------------------------- explain


@pytest.mark.parametrize("model", ["mlp", "tiny_cnn"])
def test_explain_npy_writes_the_same_attribution_as_the_python_api(model, mlp, tmp_path):
    path = mlp if model == "mlp" else TINY
    x_path, x = sample(tmp_path, path)
    out = tmp_path / "attr.npy"
    result = run("explain", path, x_path, "--method", "integrated_gradients", "--target", 3,
                 "--option", "n_steps=20", "--out", out)
    assert result.exit_code == 0, result.stderr
    expected = Explainer(path).attribute(x, method="integrated_gradients", target=3, n_steps=20)
    written = np.load(out)
    assert written.shape == x.shape
    np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-6)
    assert len(result.stdout.splitlines()) == len(x) and "explained 3" in result.stdout


def test_explain_npz_and_json_summary_name_the_tensor_and_the_file(mlp, tmp_path):
    x_path, x = sample(tmp_path, mlp, batch=3)
    result = run("explain", mlp, x_path, "-o", tmp_path / "a.npz", "--json", "--target", "1,2,4")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["target"] for r in records] == [1, 2, 4] and records[0]["file"].endswith("a.npz")
    with np.load(tmp_path / "a.npz") as npz:
        assert npz["x"].shape == x.shape


def test_explain_png_input_writes_a_heatmap_png_of_the_model_image_size(tmp_path):
    out = tmp_path / "heat.png"
    result = run("explain", TINY, photo(tmp_path), "--out", out, "--plain")
    assert result.exit_code == 0, result.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (32, 32) and img.mode == "RGB"
    assert "photo: predicted" in result.stdout and str(out) in result.stdout


def test_explain_several_images_writes_one_png_per_sample(tmp_path):
    result = run("explain", TINY, photo(tmp_path, "a.png"), photo(tmp_path, "b.png", (40, 60)),
                 "-o", tmp_path / "e.png", "--cmap", "jet")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "e_0.png").is_file() and (tmp_path / "e_1.png").is_file()
    assert len(result.stdout.splitlines()) == 2


def test_explain_with_no_arguments_explains_the_bundled_photo_as_a_cat(tmp_path):
    # A real subprocess of the installed console script, from a scratch directory.
    proc = subprocess.run([str(SCRIPT), "explain", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cat" in proc.stdout and "(3, 224, 224)" in proc.stdout
    # The first picture leads with the method of the best insertion - deletion on the photo.
    assert "with lrp.epsilon_plus_flat" in proc.stdout
    with Image.open(tmp_path / "explanation.png") as img:
        assert img.size[1] > 224 and img.size[0] > img.size[1]  # a title above, a colour bar beside


def test_a_model_given_keeps_gradient_as_the_default_method(tmp_path):
    r = run("explain", TINY, photo(tmp_path), "-o", tmp_path / "e.png")
    assert r.exit_code == 0 and "with gradient" in r.stdout


def test_preprocessing_precedence_is_flags_then_preset_then_metadata():
    e = Explainer(TINY)
    assert cli._preprocess(e, None, {}).mean == (0.5, 0.5, 0.5)  # metadata
    assert cli._preprocess(e, "imagenet", {}).mean == (0.485, 0.456, 0.406)
    pre = cli._preprocess(e, "imagenet", {"mean": (0.1, 0.2, 0.3), "size": (32, 32)})
    assert pre.mean == (0.1, 0.2, 0.3) and pre.size == (32, 32) and pre.resize >= 32


# ----------------------------------------------------------------------------- errors


def _bad_cases(tmp_path, mlp):
    x_path, _ = sample(tmp_path, TINY)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 3, 16, 16), np.float32))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((1, 3, 32, 32), np.nan, np.float32))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \x00\xff")
    return {
        "missing model": ("explain", tmp_path / "missing.onnx", x_path),
        "garbage model": ("explain", garbage, x_path),
        "missing input": ("explain", TINY, tmp_path / "nothing.npy"),
        "wrong shape": ("explain", TINY, wrong),
        "nan": ("explain", TINY, nan),
        "unknown method": ("explain", TINY, x_path, "--method", "gradientt"),
        "unknown option": ("explain", TINY, x_path, "-m", "integrated_gradients", "--option", "steps=3"),
        "option without =": ("explain", TINY, x_path, "-m", "integrated_gradients", "--option", "n_steps"),
        "bad option value": ("explain", TINY, x_path, "-m", "integrated_gradients", "--option", "n_steps=x"),
        "target out of range": ("explain", TINY, x_path, "--target", 10),
        "unknown layer": ("explain", TINY, x_path, "--layer", "no/such/tensor"),
        "bad out suffix": ("explain", TINY, x_path, "--out", tmp_path / "a.txt"),
        "no input for a non-image model": ("explain", mlp),
        "unknown flag": ("explain", TINY, x_path, "--no-such-flag"),
        "bad memory budget": ("explain", TINY, x_path, "--memory-budget", "lots"),
        "inspect missing": ("inspect", tmp_path / "missing.onnx"),
        "export multi-pass": ("export", TINY, "-m", "integrated_gradients", "-o", tmp_path / "e.onnx"),
        "unknown command": ("explian",),
    }


CASES = ["missing model", "garbage model", "missing input", "wrong shape", "nan", "unknown method",
         "unknown option", "option without =", "bad option value", "target out of range", "unknown layer",
         "bad out suffix", "no input for a non-image model", "unknown flag", "bad memory budget",
         "inspect missing", "export multi-pass", "unknown command"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_exits_2_with_one_error_line(case, tmp_path, mlp):
    result = run(*_bad_cases(tmp_path, mlp)[case])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output


def test_the_console_script_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run([str(SCRIPT), "explain", str(TINY), str(tmp_path / "none.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and "none.npy" in proc.stderr


def test_an_internal_error_is_one_line_unless_debug_asks_for_the_traceback(monkeypatch):
    def broken(_):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_inspect", broken)
    result = run("inspect", TINY)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("internal error: RuntimeError: boom")
    for debug in (("inspect", TINY, "--debug"), ("--debug", "inspect", TINY)):
        assert "Traceback" in run(*debug).stderr
    assert "Traceback" in run("inspect", TINY, env={"ONNXPLAIN_DEBUG": "1"}).stderr


def test_explain_runs_the_model_once_for_the_predicted_class(tmp_path, monkeypatch):
    """The scores the CLI prints give the predicted class; the attribution must not run the
    model again to find it (a full forward pass on a VGG-16)."""
    calls = []
    original = Explainer._forward

    def counting(self, feeds, tensors):
        calls.append(list(tensors))
        return original(self, feeds, tensors)

    monkeypatch.setattr(Explainer, "_forward", counting)
    path, x = sample(tmp_path, TINY, batch=3)
    out = tmp_path / "a.npy"
    result = run("explain", TINY, path, "-m", "gradient", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert len(calls) == 1
    records = json.loads(result.stdout)
    expected = Explainer(TINY).attribute(x, method="gradient")  # target None: its own forward
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-6, atol=1e-8)
    assert [r["target"] for r in records] == [r["predicted"] for r in records]


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("model", ["mlp", "tiny_cnn"])
def test_export_writes_an_explainer_plain_onnxruntime_runs_with_the_api_gradient(model, mlp, tmp_path):
    path = mlp if model == "mlp" else TINY
    out = tmp_path / "explainer.onnx"
    result = run("export", path, "--method", "gradient", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "onnxplain.seed" in result.stdout and "onnxplain.attribution.0" in result.stdout
    _, x = sample(tmp_path, path, batch=3)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    n_classes = sess.get_outputs()[0].shape[1] if isinstance(sess.get_outputs()[0].shape[1], int) else 5
    seed = np.eye(n_classes, dtype=np.float32)[[1, 2, 3]]
    feeds = {sess.get_inputs()[0].name: x, "onnxplain.seed": seed}
    attribution = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))["onnxplain.attribution.0"]
    expected = Explainer(path).attribute(x, method="gradient", target=[1, 2, 3])
    np.testing.assert_allclose(attribution, expected, rtol=1e-5, atol=1e-6)


def test_export_takes_method_options_and_rejects_bad_ones_with_exit_2(mlp, tmp_path):
    out = tmp_path / "lrp.onnx"
    result = run("export", mlp, "-m", "lrp", "-O", "rules=Gemm:alpha_beta", "-O", "alpha=3", "-O", "beta=2",
                 "-o", out)
    assert result.exit_code == 0, result.stderr
    _, x = sample(tmp_path, mlp, batch=2)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    n_classes = sess.get_outputs()[0].shape[1] if isinstance(sess.get_outputs()[0].shape[1], int) else 5
    seed = np.eye(n_classes, dtype=np.float32)[[1, 2]]
    outputs = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {sess.get_inputs()[0].name: x, "onnxplain.seed": seed})))
    expected = Explainer(mlp).attribute(x, method="lrp", target=[1, 2], rules="Gemm:alpha_beta", alpha=3.0, beta=2.0)
    np.testing.assert_allclose(outputs["onnxplain.attribution.0"], expected, rtol=1e-5, atol=1e-6)
    bad = run("export", mlp, "-m", "lrp", "-o", tmp_path / "x.onnx")
    assert bad.exit_code == 2 and "rules" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("export", mlp, "-m", "lrp.epsilon", "-O", "alpha=2", "-o", tmp_path / "x.onnx")
    assert bad.exit_code == 2 and "no option" in bad.stderr


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["explain", "methods", "inspect", "export"])
def test_help_of_every_command_shows_a_real_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and f"onnxplain {command}" in result.stdout.split("Examples:")[1]


def test_version_and_bare_command_help():
    assert run("--version").stdout.strip().endswith(cli.__version__)
    bare = run()
    assert bare.exit_code == 0 and "explain" in bare.stdout


def test_models_folder_can_be_moved_with_an_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXPLAIN_MODELS", str(tmp_path))
    assert cli.models_dir() == tmp_path
    monkeypatch.delenv("ONNXPLAIN_MODELS")
    assert (cli.models_dir() / "efficientnet_lite0.onnx").is_file()
    assert os.path.samefile(cli.models_dir(), MODELS)


# ----------------------------------------------------------------------------- bad options, every command

_PHOTO = MODELS / "chelsea.png"


@pytest.mark.parametrize("args, words", [
    (["evaluate", TINY, _PHOTO, "-S", "deletion:stepz=3"], ["stepz", "its settings: steps, baseline, probability"]),
    (["evaluate", TINY, _PHOTO, "-S", "deletion:steps=abc"], ["steps='abc'", "must be an integer"]),
    (["evaluate", TINY, _PHOTO, "--metrics", "selectivity", "-S", "selectivity:patch=0"], ["patch=0", "at least 1"]),
    (["evaluate", TINY, _PHOTO, "--metrics", "insertion", "-S", "insertion:baseline=fog"], ["blur, mean"]),
    (["evaluate", TINY, _PHOTO, "--methods", "integrated_gradients", "-O", "integrated_gradients:n_stepz=3"],
     ["n_stepz", "its options: n_steps"]),
    (["evaluate", TINY, _PHOTO, "-t", "pos:x"], ["is not pos:T:V"]),
    (["report", TINY, _PHOTO, "-S", "deletion:stepz=3"], ["its settings: steps"]),
    (["report", TINY, _PHOTO, "--methods", "gradient", "-O", "gradient:x=1"], ["its options: none"]),
    (["validate", TINY, TINY, _PHOTO, "-m", "integrated_gradients", "-O", "n_stepz=3"], ["its options: n_steps"]),
    (["validate", TINY, TINY, _PHOTO, "-t", "pos:1:2"], ["takes a class"]),
    (["factorize", TINY, _PHOTO, "-O", "x=1"], ["its options: none"]),
    (["maximize", TINY, "-O", "n_iterz=3"], ["its options: n_iter, lr"]),
    (["prune-study", TINY, _PHOTO, "--layer", "x", "--box", "0,0,8,8", "--baseline", "x"], ["--baseline"]),
    (["prune-study", TINY, _PHOTO, "--layer", "x", "--box", "0,0,8,8", "-t", "pos:1:2"], ["takes a class"]),
    (["explain", TINY, _PHOTO, "-m", "integrated_gradients", "-O", "n_stepz=3"], ["its options: n_steps"]),
    (["explain", TINY, _PHOTO, "-t", "box:1,2,3,4"], ["no detector layout fits"]),
    (["export", TINY, "-m", "gradient", "-O", "x=1"], ["its options: none"]),
])
def test_every_bad_option_of_every_command_exits_2_naming_the_valid_keys(args, words, tmp_path):
    """Before: `evaluate -S deletion:stepz=3` was 'internal error: TypeError' with exit 1."""
    out = {"evaluate": ["-o", tmp_path / "r.json"], "report": ["-o", tmp_path / "r.html"],
           "explain": ["-o", tmp_path / "a.png"], "export": ["-o", tmp_path / "e.onnx"]}.get(args[0], [])
    r = run(*args, *out)
    assert r.exit_code == 2, r.output
    assert "internal error" not in r.output
    for w in words:
        assert w in r.output, (w, r.output)


def test_evaluate_and_report_score_cam_maps_of_one_channel(tmp_path):
    """Before: 'the attribution must have the input's shape (1, 3, 32, 32), got (1, 1, 32, 32)'."""
    r = run("evaluate", TINY, _PHOTO, "--methods", "grad_cam,gradient", "--metrics", "deletion,infidelity",
            "-S", "deletion:steps=4", "-S", "infidelity:n_samples=2", "-o", tmp_path / "r.json", "-q")
    assert r.exit_code == 0, r.output
    assert set(json.loads((tmp_path / "r.json").read_text())["table"]) == {"grad_cam", "gradient"}
    r = run("report", TINY, _PHOTO, "--methods", "grad_cam", "--metrics", "deletion", "-S", "deletion:steps=4",
            "-o", tmp_path / "r.html", "-q", "-t", "3")
    assert r.exit_code == 0, r.output
    assert "class 3" in (tmp_path / "r.html").read_text()


# ----------------------------------------------------------------------------- scikit-learn models


@pytest.fixture(scope="module")
def sklearn_models(tmp_path_factory):
    """A regressor and a classifier as skl2onnx writes them by default (label + ZipMap'd probabilities)."""
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.linear_model import LinearRegression, LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    y = X @ np.array([1.0, 2.0, 3.0, 4.0]) + 3.0
    folder = tmp_path_factory.mktemp("skl")
    reg = LinearRegression().fit(X, y)
    clf = LogisticRegression().fit(X, (y > 3).astype(int))
    for name, est in (("reg", reg), ("clf", clf)):
        (folder / f"{name}.onnx").write_bytes(skl2onnx.to_onnx(est, X[:1]).SerializeToString())
    np.save(folder / "x.npy", X[:3])
    return folder, reg, clf, X[:3]


def test_a_regressor_from_the_cli_says_its_value_not_a_predicted_class(sklearn_models, tmp_path):
    """Before: 'x_0: predicted 0, explained 0 with gradient' for a LinearRegression."""
    folder, reg, _, x = sklearn_models
    r = run("explain", folder / "reg.onnx", folder / "x.npy", "-o", tmp_path / "a.npy")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, v in zip(lines, reg.predict(x)):
        assert f"value {v:.4g}" in line and "predicted" not in line, line
    records = json.loads(run("explain", folder / "reg.onnx", folder / "x.npy", "-o", tmp_path / "a.npy",
                             "--json").stdout)
    np.testing.assert_allclose([r["value"] for r in records], reg.predict(x), rtol=1e-5)
    np.testing.assert_allclose([r["score"] for r in records], reg.predict(x), rtol=1e-5)


def test_a_classifier_from_the_cli_names_its_predicted_class_and_score_never_a_dash(sklearn_models, tmp_path):
    """Before: 'x_0: predicted -, explained - with gradient' for a LogisticRegression (label + ZipMap)."""
    folder, _, clf, x = sklearn_models
    r = run("explain", folder / "clf.onnx", folder / "x.npy", "-o", tmp_path / "a.npy")
    assert r.exit_code == 0, r.output
    assert "-," not in r.stdout and " - " not in r.stdout
    for line, c in zip(r.stdout.strip().splitlines(), clf.predict(x)):
        assert f"predicted {c}," in line and f"explained {c} " in line, line
    records = json.loads(run("explain", folder / "clf.onnx", folder / "x.npy", "-o", tmp_path / "a.npy",
                             "--json").stdout)
    p = clf.predict_proba(x)
    np.testing.assert_allclose([r["score"] for r in records], p[np.arange(len(x)), clf.predict(x)], rtol=1e-5)


# ----------------------------------------------------------------------------- method names


@pytest.mark.parametrize("spelling, name", [
    ("integrated-gradients", "integrated_gradients"), ("Gradient", "gradient"), ("Integrated Gradients",
     "integrated_gradients"), ("LRP-Epsilon", "lrp.epsilon"), ("grad-cam", "grad_cam")])
def test_a_method_name_with_other_case_or_separators_is_the_one_method_it_spells(spelling, name, mlp, tmp_path):
    from onnxplain.methods import get_method

    assert get_method(spelling).name == name
    if name in ("integrated_gradients", "gradient"):
        path, _ = sample(tmp_path, mlp)
        r = run("explain", mlp, path, "-m", spelling, "-o", tmp_path / "a.npy")
        assert r.exit_code == 0, r.output
        assert f"with {name}" in r.stdout


@pytest.mark.parametrize("spelling, suggested", [
    ("IG", ["integrated_gradients"]), ("lrp.epsilon_plus_flt", ["lrp.epsilon_plus_flat"]), ("lpr", ["lrp"]),
    ("lrp.epsilonplus", ["lrp.epsilon_plus"]), ("kernelshap", ["kernel_shap"]), ("smooth_grad", ["smoothgrad"])])
def test_an_unknown_method_name_suggests_the_closest_names_and_exits_2(spelling, suggested, mlp, tmp_path):
    path, _ = sample(tmp_path, mlp)
    r = run("explain", mlp, path, "-m", spelling, "-o", tmp_path / "a.npy")
    assert r.exit_code == 2
    hint = r.stderr.split("did you mean", 1)[1].split("?")[0]
    assert all(s in [h.strip() for h in hint.split(",")] for s in suggested), r.stderr


# ----------------------------------------------------------------------------- export: shapes, size


def _weight_bytes(model) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def test_export_table_shows_the_exported_input_shape(tmp_path):
    """Before: `--input-shape 1,3,100,100` wrote a 100x100 explainer and printed the 224 table."""
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "fcn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fcn.onnx"))
    out = tmp_path / "e.onnx"
    r = run("export", tmp_path / "fcn.onnx", "--input-shape", "1,3,20,24", "-o", out)
    assert r.exit_code == 0, r.output
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith(("feed", "read"))}
    assert "3, 20, 24)" in rows["x"] and "3, 20, 24)" in rows["onnxplain.attribution.0"], r.stdout
    assert "?" not in rows["x"] and "h" not in rows["x"].split("float32")[1]
    declared = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in declared][1:] == [3, 20, 24]


def test_an_exported_gradient_explainer_holds_each_conv_weight_once(tmp_path):
    """Before: every stride-1 Conv weight was also stored flipped (31.7 MB for an 18.5 MB model);
    the flipped kernel is now derived in the graph, and onnxruntime folds it at load."""
    out = tmp_path / "e.onnx"
    assert run("export", TINY, "-m", "gradient", "-o", out).exit_code == 0
    exported, model = onnx.load(str(out)), onnx.load(str(TINY))
    assert _weight_bytes(exported) <= _weight_bytes(model) + 4096
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    seed = np.eye(10, dtype=np.float32)[[1, 7]]
    got = ort.InferenceSession(str(out)).run(["onnxplain.attribution.0"], {"input": x, "onnxplain.seed": seed})[0]
    np.testing.assert_allclose(got, Explainer(TINY).attribute(x, method="gradient", target=[1, 7]),
                               rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- providers, info


def _script(*args, cwd=None):
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_a_cuda_provider_that_cannot_run_falls_back_with_one_warning_line(tmp_path):
    """Before: onnxruntime's red 'Failed to load library ... libcublasLt.so' errors (twice),
    then a silent run on the CPU with exit 0."""
    from onnxplain import runtime

    if runtime.cuda_works():
        pytest.skip("CUDA runs on this machine: nothing falls back")
    x, _ = sample(tmp_path, TINY, batch=1)
    r = _script("explain", TINY, x, "--providers", "CUDAExecutionProvider,CPUExecutionProvider",
                "-o", tmp_path / "a.npy")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("warning: CUDAExecutionProvider") and "CPUExecutionProvider" in lines[0]
    assert "onnxruntime:Default" not in r.stderr and "\x1b[" not in r.stderr
    assert np.load(tmp_path / "a.npy").shape == (1, 3, 32, 32)


def test_info_prints_the_providers_that_really_work():
    from onnxplain import runtime

    r = _script("info")
    assert r.returncode == 0, r.stderr
    assert "onnxruntime:Default" not in r.stderr
    works = [line for line in r.stdout.splitlines() if line.strip().startswith("works")]
    assert works and "CPUExecutionProvider" in works[0]
    assert ("CUDAExecutionProvider" in works[0]) == runtime.cuda_works()
    info = json.loads(_script("info", "--json").stdout)
    assert "CPUExecutionProvider" in info["working_providers"]
    assert set(info["working_providers"]) <= set(info["installed_providers"])
    for p in set(info["installed_providers"]) - set(info["working_providers"]):
        assert info["problems"][p]  # why it does not work, e.g. a missing CUDA library


# ----------------------------------------------------------------------------- pictures


def _png(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(int)


def test_every_picture_has_a_title_and_a_colour_bar(tmp_path):
    """Before: a bare 32x32 map with no colour bar and no legend."""
    r = run("explain", TINY, photo(tmp_path), "-o", tmp_path / "e.png", "-t", "3")
    assert r.exit_code == 0, r.output
    pic = _png(tmp_path / "e.png")
    assert pic.shape[0] >= 224 and pic.shape[1] > pic.shape[0]
    assert (pic[:16] < 80).any()  # the title's text
    # The bar: bwr's two ends, red at the top and blue at the bottom, in one column at the right.
    right = pic[:, -80:]
    red = (right[..., 0] > 200) & (right[..., 1] < 40) & (right[..., 2] < 40)
    blue = (right[..., 2] > 200) & (right[..., 0] < 40) & (right[..., 1] < 40)
    assert red.any() and blue.any()
    assert np.nonzero(red)[0].mean() < np.nonzero(blue)[0].mean()


def test_visual_options_sign_view_alpha_clip_change_the_picture(tmp_path):
    x = photo(tmp_path)
    base = ["explain", TINY, x, "-t", "3", "--plain"]
    assert run(*base, "-o", tmp_path / "all.png").exit_code == 0
    assert run(*base, "--sign", "positive", "--view", "heatmap", "-o", tmp_path / "pos.png").exit_code == 0
    assert run(*base, "--view", "side-by-side", "-o", tmp_path / "sbs.png").exit_code == 0
    assert run(*base, "--overlay-alpha", "0", "-o", tmp_path / "a0.png").exit_code == 0
    assert run(*base, "--clip", "50", "-o", tmp_path / "c50.png", "--view", "heatmap").exit_code == 0
    pos, sbs = _png(tmp_path / "pos.png"), _png(tmp_path / "sbs.png")
    lut = __import__("onnxplain.visualize", fromlist=["colormap"]).colormap("inferno")
    assert np.isin(pos.reshape(-1, 3) @ [65536, 256, 1], lut.astype(int) @ [65536, 256, 1]).all()  # sequential
    assert sbs.shape[1] == 3 * 32 + 8
    a0 = _png(tmp_path / "a0.png")
    assert (a0[..., 0] == a0[..., 1]).all()  # alpha 0: only the grey photo
    c50 = _png(tmp_path / "c50.png")
    saturated = lambda p: ((p == [255, 0, 0]).all(-1) | (p == [0, 0, 255]).all(-1)).mean()  # noqa: E731
    assert saturated(c50) > 0.4  # half of the pixels at or beyond the 50th percentile
    assert run(*base, "--sign", "sideways", "-o", tmp_path / "x.png").exit_code == 2


# ----------------------------------------------------------------------------- progress on a terminal


def _on_a_terminal(args, cwd):
    """stderr of the console script when stderr is a terminal (a pseudo-terminal here)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([str(SCRIPT), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_maximize_shows_a_progress_bar_on_a_terminal_only(tmp_path):
    """Before: maximize ran its steps silently, even on a terminal."""
    args = ["maximize", TINY, "--target", "3", "-O", "n_iter=30", "-o", tmp_path / "m.png"]
    rc, err = _on_a_terminal(args, tmp_path)
    assert rc == 0, err
    assert "maximize" in err and "%" in err
    rc, err = _on_a_terminal(args + ["--quiet"], tmp_path)
    assert rc == 0 and "%" not in err
    piped = _script(*args)
    assert piped.returncode == 0 and "%" not in piped.stderr


@pytest.mark.parametrize("lo, hi", [(-0.137, 1.0), (0.0, 1.0), (0.0, 1.734), (-2.5, 3.01), (0.0, 12.7)])
def test_the_pruning_study_plot_has_round_ticks_spanning_its_values(lo, hi):
    """Before: five ticks from np.linspace(lo, hi): -0.14, 0.15, 0.43, 0.72, 1.00."""
    from onnxplain.commands.prune import round_ticks

    ticks = round_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 12
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert any(abs(mantissa - m) < 1e-9 for m in (1, 2, 2.5, 5)), step
    np.testing.assert_allclose(np.diff(ticks), step)
    assert all(abs(t / step - round(t / step)) < 1e-9 for t in ticks)


# ----------------------------------------------------------------------------- folders, globs, -o DIR/


def _photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    img = Image.open(MODELS / "chelsea.png")
    img.save(d / "cat.png")
    img.transpose(Image.FLIP_LEFT_RIGHT).save(d / "tac.png")
    img.rotate(90).save(d / "other.jpg")
    return d


def test_explain_takes_a_folder_and_names_outputs_after_the_inputs(tmp_path):
    """Before: a folder was taken for the model; -o DIR/ was refused (not .png/.npy/.npz)."""
    d = _photos(tmp_path)
    r = run("explain", TINY, d, "-o", str(tmp_path / "out") + "/", "-t", "3", "--json")
    assert r.exit_code == 0, r.output
    records = json.loads(r.stdout)
    assert sorted(Path(x["file"]).name for x in records) == ["cat.gradient.png", "other.gradient.png",
                                                             "tac.gradient.png"]
    assert all(Path(x["file"]).is_file() for x in records)
    assert all(isinstance(x["score"], float) for x in records)


def test_explain_takes_a_glob_and_writes_arrays_per_input_into_a_folder(tmp_path):
    d = _photos(tmp_path)
    r = run("explain", TINY, str(d / "*.png"), "-o", str(tmp_path / "arr") + "/", "--plain", "-t", "3",
            "--format", "npy")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "arr").iterdir())
    assert files == ["cat.gradient.npy", "tac.gradient.npy"]
    x, _ = onnxplain_load(d / "cat.png")
    np.testing.assert_allclose(np.load(tmp_path / "arr" / "cat.gradient.npy"),
                               Explainer(TINY).attribute(x, method="gradient", target=3), rtol=1e-5, atol=1e-9)
    bad = run("explain", TINY, str(d / "*.bmp"), "-o", str(tmp_path / "x") + "/")
    assert bad.exit_code == 2 and "matches no" in bad.stderr


def onnxplain_load(path):
    import onnxplain

    return onnxplain.load_image(path, TINY)


# ----------------------------------------------------------------------------- --json everywhere


def test_every_command_takes_json():
    """Before: export, report and prune-study had no --json."""
    for name, cmd in cli.main.commands.items():
        assert "as_json" in [p.name for p in cmd.params], name


def test_export_report_and_prune_study_print_json(tmp_path):
    e = json.loads(run("export", TINY, "-o", tmp_path / "e.onnx", "--json").stdout)
    assert e["file"] == str(tmp_path / "e.onnx") and e["method"] == "gradient"
    assert [f["name"] for f in e["feeds"]] == ["input", "onnxplain.seed"] and e["feeds"][0]["shape"][1:] == [3, 32, 32]
    r = run("report", TINY, _PHOTO, "--methods", "gradient", "--metrics", "deletion", "-S", "deletion:steps=4",
            "-o", tmp_path / "r.html", "-q", "--json")
    rep = json.loads(r.stdout)
    assert rep["file"] == str(tmp_path / "r.html") and isinstance(rep["table"]["gradient"]["deletion"], float)
    p = run("prune-study", TINY, _PHOTO, "--layer", "/relu2/Relu_output_0", "--box", "0,0,16,16", "-t", "3",
            "--k", "1,2", "--n-steps", "4", "--json")
    res = json.loads(p.stdout)
    assert res["layer"] == "/relu2/Relu_output_0" and len(res["rows"]) == 1 + 2 * 2  # unpruned, 2 rankings x 2 k


def test_a_long_list_of_inputs_is_explained_in_groups_under_the_memory_budget(tmp_path, monkeypatch):
    """Before: every input was loaded into one batch, whatever the budget."""
    d = _photos(tmp_path)
    sizes = []
    original = Explainer.attribute

    def counting(self, x, *a, **k):
        sizes.append(len(x))
        return original(self, x, *a, **k)

    monkeypatch.setattr(Explainer, "attribute", counting)
    # tiny_cnn's input is 3x32x32 float32 = 12 KiB a sample: 200 KB fits one sample per group.
    r = run("explain", TINY, d, "-t", "3", "--memory-budget", "200KB", "-o", tmp_path / "e.png", "--json", "--plain")
    assert r.exit_code == 0, r.output
    assert sizes == [1, 1, 1]
    records = json.loads(r.stdout)
    assert [Path(x["file"]).name for x in records] == ["e_0.png", "e_1.png", "e_2.png"]
    assert [x["sample"] for x in records] == ["cat", "other", "tac"]
    sizes.clear()
    whole = run("explain", TINY, d, "-t", "3", "-o", tmp_path / "all.png", "--json", "--plain")
    assert whole.exit_code == 0 and sizes == [3]
    for a, b in zip(records, json.loads(whole.stdout)):
        assert a["score"] == pytest.approx(b["score"], rel=1e-6)
        np.testing.assert_array_equal(_png(a["file"]), _png(tmp_path / Path(b["file"]).name))


def test_contrastive_excitation_backprop_from_the_cli_reads_its_map_at_a_mid_layer(tmp_path):
    """The CLI's picture shows what the method is for (the paper's mid-layer map); the
    Python default, tested against the dual model, stays the map at the input."""
    r = run("explain", TINY, photo(tmp_path), "-m", "contrastive_excitation_backprop", "-t", "3",
            "-o", tmp_path / "c.npy")
    assert r.exit_code == 0, r.output
    assert "saliency_layer=/relu1/Relu_output_0" in r.stderr
    a = np.load(tmp_path / "c.npy")
    assert a.shape == (1, 1, 32, 32)
    x, _ = onnxplain_load(photo(tmp_path))
    expected = Explainer(TINY).attribute(x, method="contrastive_excitation_backprop", target=3,
                                         saliency_layer="/relu1/Relu_output_0")
    np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-12)
    at_input = run("explain", TINY, photo(tmp_path), "-m", "contrastive_excitation_backprop", "-t", "3",
                   "-O", "saliency_layer=", "-o", tmp_path / "i.npy")
    assert at_input.exit_code == 0, at_input.output
    assert np.load(tmp_path / "i.npy").shape == (1, 3, 32, 32)
