"""Activation maximization: it raises the target, stays in the input range, works through a
generator's code space, and the `maximize` command."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxplain import Explainer, cli
from onnxplain.errors import OptionError
from onnxplain.io import Preprocess, prepare_images
from onnxplain.methods.maximize import activation_maximization, input_range, to_image

MODELS = Path(__file__).resolve().parent.parent / "models"
TINY = MODELS / "tiny_cnn.onnx"
MNIST = MODELS / "mnist_cnn.onnx"


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def tiny():
    return Explainer(TINY)


def _rising(scores, margin):
    """Final steps clearly above the first ones (the jitter makes single steps noisy)."""
    scores = np.asarray(scores)
    return scores[-10:].mean() > scores[:10].mean() + margin


def test_maximizing_a_class_of_tiny_cnn_beats_random_inputs(tiny):
    r = activation_maximization(tiny, target=0, n_iter=100)
    random_best = tiny.predict(np.random.default_rng(0).normal(size=(200, 3, 32, 32)).astype(np.float32))[:, 0].max()
    assert r.final > r.initial + 0.4
    assert r.final > random_best
    assert _rising(r.scores, 0.3)
    low, high = input_range(Preprocess.from_metadata(tiny.preprocess_metadata()), 3)
    assert r.input.shape == (1, 3, 32, 32)
    assert r.input.min() >= low.min() - 1e-6 and r.input.max() <= high.max() + 1e-6


def test_maximizing_a_digit_of_the_mnist_cnn_makes_it_the_prediction():
    e = Explainer(MNIST)
    r = activation_maximization(e, target=7, n_iter=60)
    assert r.final > r.initial + 10
    assert _rising(r.scores, 5)
    assert int(e.predict(r.input).argmax()) == 7


def test_maximizing_a_neuron_raises_its_channel_mean(tiny):
    r = activation_maximization(tiny, neuron="/relu1/Relu_output_0,2", n_iter=40)
    assert r.final > r.initial + 1.0 and not r.stuck
    act = tiny._forward({"input": r.input}, ["/relu1/Relu_output_0"])["/relu1/Relu_output_0"]
    assert act[0, 2].mean() == pytest.approx(r.final, rel=1e-5)


def test_the_regularisers_are_seeded(tiny):
    a = activation_maximization(tiny, target=1, n_iter=12, seed=3)
    b = activation_maximization(tiny, target=1, n_iter=12, seed=3)
    c = activation_maximization(tiny, target=1, n_iter=12, seed=4)
    np.testing.assert_array_equal(a.input, b.input)
    assert not np.array_equal(a.input, c.input)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """A linear generator code (8,) -> image (3,32,32), in opset 13 (the model is 17)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["code", "W"], ["flat"]), helper.make_node("Reshape", ["flat", "shape"], ["image"])]
    graph = helper.make_graph(
        nodes, "generator", [helper.make_tensor_value_info("code", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        initializer=[numpy_helper.from_array((0.5 * rng.normal(size=(8, 3072))).astype(np.float32), "W"),
                     numpy_helper.from_array(np.array([-1, 3, 32, 32], dtype=np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("gen") / "generator.onnx"
    onnx.save(model, str(path))
    return path, numpy_helper.to_array(model.graph.initializer[0])


def test_ascent_in_a_generator_code_space_raises_the_target(tiny, generator):
    path, W = generator
    r = activation_maximization(tiny, target=0, generator=str(path), n_iter=60)
    assert r.final > r.initial + 0.5
    assert _rising(r.scores, 0.3)
    assert r.code.shape == (1, 8)
    # The input is the generator's image of the code, and the model scores it as reported.
    np.testing.assert_allclose(r.input.reshape(1, -1), r.code @ W, rtol=1e-4, atol=1e-4)
    assert tiny.predict(r.input)[0, 0] == pytest.approx(r.final, rel=1e-4)


def test_to_image_undoes_the_preprocessing(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    pre = Preprocess.from_metadata(Explainer(TINY).preprocess_metadata())
    x, _ = prepare_images([tmp_path / "p.png"], pre)
    np.testing.assert_array_equal(to_image(x, pre), pixels)


def test_bad_requests_are_one_clear_error(tiny):
    with pytest.raises(OptionError, match="target class"):
        activation_maximization(tiny)
    with pytest.raises(OptionError, match="not both"):
        activation_maximization(tiny, target=1, neuron="/relu1/Relu_output_0,2")
    with pytest.raises(OptionError, match="unknown neuron tensor"):
        activation_maximization(tiny, neuron="nope,2")
    with pytest.raises(OptionError, match="out of range"):
        activation_maximization(tiny, neuron="/relu1/Relu_output_0,99")
    with pytest.raises(OptionError, match="TENSOR,CHANNEL"):
        activation_maximization(tiny, neuron="justaname")
    with pytest.raises(OptionError, match="no option"):
        activation_maximization(tiny, target=1, steps=3)


def test_maximize_command_writes_the_picture_and_the_array(tmp_path, generator):
    r = run("maximize", TINY, "--target", "0", "-O", "n_iter=30", "-o", tmp_path / "am.png")
    assert r.exit_code == 0, r.output
    assert "maximised the score of class 0" in r.output
    assert Image.open(tmp_path / "am.png").size == (32, 32)
    r = run("maximize", TINY, "--neuron", "/relu1/Relu_output_0,2", "-O", "n_iter=10", "--json", "-o", tmp_path / "n.npy")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["final"] > report["initial"] and len(report["scores"]) == 10
    assert np.load(tmp_path / "n.npy").shape == (1, 3, 32, 32)
    r = run("maximize", TINY, "-t", "0", "--generator", generator[0], "-O", "n_iter=10", "-o", tmp_path / "g.png")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    ([], "target class"),
    (["-t", "0", "-O", "n_iter=0"], "must be positive"),
    (["-t", "0", "-O", "steps=3"], "no option"),
    (["-t", "0", "-o", "am.jpg"], "--out must end"),
    (["-t", "0", "--neuron", "x,1", "-O", "neuron=y,2"], "give neuron once"),
    (["-t", "99"], "out of range"),
])
def test_maximize_command_bad_arguments_exit_2_with_one_line(args, message):
    r = run("maximize", TINY, *args)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and message in lines[0]
