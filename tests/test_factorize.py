"""Building Blocks factorization: NMF and PCA, the class-attribution collection, the factors'
classes, the picture, and the `factorize` command."""

import colorsys
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxplain import Explainer, cli
from onnxplain.errors import InputError, OptionError
from onnxplain.factorize import class_attributions, default_layer, factorize, nmf, pca, picture

MODELS = Path(__file__).resolve().parent.parent / "models"
TINY = MODELS / "tiny_cnn.onnx"
TINY_LAYER = "/relu1/Relu_output_0"


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _best_correlations(true, found):
    """For each column of `true`, its best correlation with a column of `found`."""
    return [max(np.corrcoef(t, f)[0, 1] for f in found.T) for t in true.T]


# ----------------------------------------------------------------------------- NMF and PCA


def test_nmf_recovers_planted_nonnegative_factors_up_to_permutation_and_scale():
    rng = np.random.default_rng(0)
    W = rng.random((120, 3)) * (rng.random((120, 3)) < 0.4)  # sparse, so the factors are identifiable
    H = rng.random((3, 40)) * (rng.random((3, 40)) < 0.5)
    W[:3], H[:, :3] = np.eye(3), np.eye(3)  # each factor has a pure row and column
    found_W, found_H, losses = nmf(W @ H, 3, n_iter=3000, tol=0)
    assert min(_best_correlations(W, found_W)) > 0.99
    assert min(_best_correlations(H.T, found_H.T)) > 0.99
    assert losses[-1] < 1e-4 * losses[0]


def test_nmf_objective_never_increases():
    rng = np.random.default_rng(1)
    V = rng.random((60, 4)) @ rng.random((4, 30)) + 0.1 * rng.random((60, 30))
    for seed in range(3):
        _, _, losses = nmf(V, 3, n_iter=300, tol=0, seed=seed)
        assert np.all(np.diff(losses) <= 1e-12 * losses[0])


def test_nmf_refuses_negative_matrices_and_impossible_ranks():
    with pytest.raises(InputError, match="non-negative"):
        nmf(-np.ones((3, 3)), 1)
    with pytest.raises(OptionError, match="between 1 and 3"):
        nmf(np.ones((3, 5)), 4)


def test_pca_agrees_with_numpy_svd_of_the_centred_matrix():
    rng = np.random.default_rng(2)
    V = rng.normal(size=(50, 12)) @ np.diag(np.linspace(3, 0.1, 12))
    scores, comps, mean = pca(V, 4)
    _, S, Vt = np.linalg.svd(V - V.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(mean, V.mean(axis=0))
    np.testing.assert_allclose(np.abs(comps), np.abs(Vt[:4]), atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(scores, axis=0), S[:4], rtol=1e-10)
    np.testing.assert_allclose(comps @ comps.T, np.eye(4), atol=1e-10)
    # Signed so that each component's largest entry is positive.
    assert np.all(comps[np.arange(4), np.abs(comps).argmax(axis=1)] > 0)


# ----------------------------------------------------------------------------- class attributions


def test_class_attributions_equal_per_class_input_x_gradient_summed_over_channels():
    e = Explainer(TINY)
    x = np.random.default_rng(3).normal(size=(1, 3, 32, 32)).astype(np.float32)
    classes = [0, 3, 7, 3]
    maps = class_attributions(e, x, TINY_LAYER, classes)
    assert maps.shape == (4, 32, 32)
    for row, c in zip(maps, classes):
        want = e.attribute(x, method="input_x_gradient", target=c, layer=TINY_LAYER)[0].sum(axis=0)
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def two_regions(tmp_path_factory):
    """x (1,8,8) -> 1x1 Conv to 4 channels -> Relu ('feat') -> Flatten -> Gemm -> 6 classes.

    Classes 0-2 read only the left half of 'feat', classes 3-5 only the right half, each
    with its own strength, so class attributions at 'feat' have two spatial factors.
    """
    rng = np.random.default_rng(4)
    conv = np.array([1.0, 0.5, 2.0, 1.5], dtype=np.float32).reshape(4, 1, 1, 1)
    left = np.zeros((4, 8, 8), dtype=np.float32)
    left[:, :, :4] = 1.0
    right = 1.0 - left
    strength = [1.0, 0.7, 0.4, 0.9, 0.6, 0.3]
    cols = [s * (left if c < 3 else right) * (1 + 0.1 * rng.random((4, 8, 8))) for c, s in enumerate(strength)]
    dense = np.stack([c.reshape(-1) for c in cols], axis=1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["pre"]), helper.make_node("Relu", ["pre"], ["feat"]),
             helper.make_node("Flatten", ["feat"], ["flat"]), helper.make_node("Gemm", ["flat", "Wd"], ["logits"])]
    graph = helper.make_graph(
        nodes, "two_regions", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6])],
        initializer=[numpy_helper.from_array(conv, "Wc"), numpy_helper.from_array(dense, "Wd")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("two_regions") / "two_regions.onnx"
    onnx.save(model, str(path))
    x = (0.5 + np.random.default_rng(5).random((1, 1, 8, 8))).astype(np.float32)
    return path, x


@pytest.mark.parametrize("algo", ["nmf", "pca"])
def test_two_spatial_regions_come_out_as_two_factors_with_their_class_groups(two_regions, algo):
    path, x = two_regions
    f = factorize(Explainer(path), x, layer="feat", k=2, classes="all", algo=algo)
    groups = {frozenset(r["class"] for r in ranked[:3]) for ranked in f.ranked(top=3)}
    if algo == "nmf":
        assert groups == {frozenset({0, 1, 2}), frozenset({3, 4, 5})}
        for spatial, ranked in zip(f.spatial, f.ranked(top=1)):
            side = spatial[:, :4] if ranked[0]["class"] < 3 else spatial[:, 4:]
            assert side.sum() > 0.99 * spatial.sum()  # the factor lives on its group's half
            assert ranked[0]["class"] in (0, 3)  # the strongest class of the group leads
        assert f.error < 0.05  # the weights vary by 10% within a group: nearly rank 2
    else:  # PCA's first component already splits the groups by sign
        first = f.loadings[0]
        assert np.sign(first[:3]).tolist() == [np.sign(first[0])] * 3
        assert np.all(np.sign(first[3:]) == -np.sign(first[0]))


def test_activation_factors_split_each_class_attribution(two_regions):
    path, x = two_regions
    f = factorize(Explainer(path), x, layer="feat", k=1, classes="all", of="activation")
    # One factor explains the activations exactly: it carries every class's whole attribution.
    np.testing.assert_allclose(f.loadings[0], f.maps.reshape(6, -1).sum(axis=1), rtol=1e-4)
    assert f.spatial.shape == (1, 8, 8)


def test_the_picture_has_the_image_size_and_one_hue_per_factor(two_regions):
    path, x = two_regions
    f = factorize(Explainer(path), x, layer="feat", k=2, classes="all")
    image = np.random.default_rng(6).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    pic = picture(f, image)
    assert pic.shape == (40, 50, 3) and pic.dtype == np.uint8
    hsv = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in pic.reshape(-1, 3)])
    coloured = hsv[hsv[:, 1] > 0.5, 0] * 360
    assert len(coloured) > 0.5 * len(hsv)
    blue = (coloured > 190) & (coloured < 240)
    orange = (coloured > 15) & (coloured < 45)
    assert blue.mean() > 0.3 and orange.mean() > 0.3 and (blue | orange).mean() > 0.95
    # The left half is one factor's hue, the right half the other's.
    left, right = picture(f, image)[:, :20], picture(f, image)[:, 30:]
    assert (left[..., 2].astype(int) - left[..., 0]).mean() * (right[..., 2].astype(int) - right[..., 0]).mean() < 0


def test_bad_arguments_are_one_clear_error(two_regions):
    path, x = two_regions
    e = Explainer(path)
    with pytest.raises(OptionError, match="algo"):
        factorize(e, x, layer="feat", algo="ica")
    with pytest.raises(OptionError, match="unknown layer"):
        factorize(e, x, layer="nope")
    with pytest.raises(OptionError, match="classes"):
        factorize(e, x, layer="feat", classes="most")
    with pytest.raises(OptionError, match="at most"):
        factorize(e, x, layer="feat", k=7, classes="all")
    with pytest.raises(InputError, match="one sample"):
        factorize(e, np.concatenate([x, x]), layer="feat")


def test_default_layer_is_the_last_block_output_of_the_second_smallest_size():
    assert default_layer(Explainer(MODELS / "efficientnet_lite0.onnx")) == "/_blocks.10/Add_output_0"
    assert default_layer(Explainer(TINY)) == TINY_LAYER


# ----------------------------------------------------------------------------- the command


def _photo(tmp_path):
    pixels = np.random.default_rng(7).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    return tmp_path / "photo.png"


def test_factorize_command_writes_the_picture_and_prints_ranked_classes(tmp_path):
    out = tmp_path / "f.png"
    r = run("factorize", TINY, _photo(tmp_path), "--layer", "/relu2/Relu_output_0", "--classes", "all", "-o", out)
    assert r.exit_code == 0, r.output
    assert "factor 1 (blue):" in r.output and "factor 2 (orange):" in r.output
    assert Image.open(out).size == (32, 32)
    r = run("factorize", TINY, _photo(tmp_path), "--of", "activation", "--algo", "pca", "-k", "3", "--json",
            "-o", tmp_path / "f.npz")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["factors"] == 3 and len(report["ranked"]) == 3 and report["layer"] == TINY_LAYER
    with np.load(tmp_path / "f.npz") as z:
        assert z["spatial"].shape == (3, 32, 32) and z["loadings"].shape == (3, 10)


def test_factorize_command_on_the_bundled_photo_names_imagenet_classes(tmp_path):
    r = run("factorize", "--classes", "top10", "-q", "-o", tmp_path / "chelsea.png")
    assert r.exit_code == 0, r.output
    assert "/_blocks.10/Add_output_0 (14x14)" in r.output
    assert any(cat in r.output for cat in ("tiger cat", "tabby", "Egyptian cat", "lynx"))
    assert Image.open(tmp_path / "chelsea.png").size == (224, 224)


@pytest.mark.parametrize("args, message", [
    (["--classes", "most"], "--classes"),
    (["--layer", "nope"], "unknown layer"),
    (["-k", "0"], "--factors"),
    (["--algo", "ica"], "--algo"),
    (["-m", "lrp.nothing"], "unknown method"),
    (["-o", "f.jpg"], "--out must end in .png or .npz"),
])
def test_factorize_command_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    r = run("factorize", TINY, _photo(tmp_path), *args)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and message in lines[0]


# ----------------------------------------------------------------------------- progress on a terminal
SCRIPT = Path(sys.executable).parent / "onnxplain"


def _stderr_on_a_terminal(args, cwd):
    """(exit code, stderr) of the console script with stderr a pseudo-terminal."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([str(SCRIPT), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the other end closed: the command is done
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_factorize_shows_a_progress_bar_on_a_terminal_only(tmp_path):
    """Before: factorize collected its class attributions silently, even on a terminal."""
    args = ["factorize", TINY, _photo(tmp_path), "--classes", "all", "-o", tmp_path / "f.png"]
    rc, err = _stderr_on_a_terminal(args, tmp_path)
    assert rc == 0, err
    assert "factorize: class attributions" in err and "%" in err
    rc, err = _stderr_on_a_terminal(args + ["--quiet"], tmp_path)
    assert rc == 0 and "%" not in err and "factorize:" not in err
    piped = subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert piped.returncode == 0 and "%" not in piped.stderr and "factorize:" not in piped.stderr


def test_the_class_attributions_do_not_depend_on_how_many_classes_one_run_takes():
    """The progress bar splits the classes into runs: each class's map is its own row's."""
    ex = Explainer(TINY)
    x = np.random.default_rng(3).normal(size=(1, 3, 32, 32)).astype(np.float32)
    together = class_attributions(ex, x, TINY_LAYER, list(range(10)), label=None)
    alone = np.concatenate([class_attributions(ex, x, TINY_LAYER, [c], label=None) for c in range(10)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-7 * np.abs(alone).max())
