"""The target grammar as a specification: every form's seed against a seed written by hand,
every misuse a typed error that shows the forms, and through Explainer.attribute the
gradient of sum(seed * output) against central finite differences, on (N, C), (N, T, V),
sequence-first (T, N, C) and dense (N, C, H, W) outputs."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxplain import Explainer
from onnxplain.errors import InputError, OptionError
from onnxplain.target import FORMS, TargetScorer, as_target, parse_target

RNG = np.random.default_rng(0)
N, T, D, V, C, H, W = 2, 4, 3, 5, 3, 6, 5


def _model(nodes, x_dims, y_dims, inits):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_dims)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# Each model comes with a float64 numpy copy of its forward pass, for the finite differences.

def classifier():
    w = RNG.normal(size=(D, C)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])],
               ["N", D], ["N", C], {"w": w})
    return m, (lambda x: np.tanh(x @ w.astype(np.float64))), (N, D)


def language_model():
    """(N, T, D) -> (N, T, V): positions mixed by a constant matrix, so each position's
    logits depend on every input position."""
    p = RNG.normal(size=(T, T)).astype(np.float32)
    w = RNG.normal(size=(D, V)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["p", "x"], ["mixed"]), helper.make_node("MatMul", ["mixed", "w"], ["h"]),
                helper.make_node("Tanh", ["h"], ["y"])], ["N", T, D], ["N", T, V], {"p": p, "w": w})
    return m, (lambda x: np.tanh(p.astype(np.float64) @ x @ w.astype(np.float64))), (N, T, D)


def sequence_first():
    """(N, T, D) -> (T, N, C): the output keeps the batch on axis 1."""
    p = RNG.normal(size=(T, T)).astype(np.float32)
    w = RNG.normal(size=(D, C)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["p", "x"], ["mixed"]), helper.make_node("MatMul", ["mixed", "w"], ["h"]),
                helper.make_node("Tanh", ["h"], ["t"]), helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0, 2])],
               ["N", T, D], [T, "N", C], {"p": p, "w": w})

    def f(x):
        return np.tanh(p.astype(np.float64) @ x @ w.astype(np.float64)).transpose(1, 0, 2)

    return m, f, (N, T, D)


def segmenter():
    """(N, 2, H, W) -> (N, C, H, W): a 3x3 convolution (same padding), then tanh."""
    k = RNG.normal(size=(C, 2, 3, 3)).astype(np.float32)
    m = _model([helper.make_node("Conv", ["x", "k"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Tanh", ["h"], ["y"])],
               ["N", 2, H, W], ["N", C, H, W], {"k": k})

    def f(x):
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((x.shape[0], C, H, W))
        for i in range(3):
            for j in range(3):
                out += np.einsum("ncij,oc->noij", xp[:, :, i:i + H, j:j + W], k[:, :, i, j].astype(np.float64))
        return np.tanh(out)

    return m, f, (N, 2, H, W)


def fd_gradient(f, x, seed, eps=1e-6):
    """Central differences of sum(seed * f(x)) in float64."""
    x = x.astype(np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (np.sum(seed * f(up)) - np.sum(seed * f(down))) / (2 * eps)
    return grad


def check(model_fn, target, expected_seed):
    """The seed (batch first, as methods hold it) is the hand-made one, and the gradient
    the explainer computes is that of sum(seed * output) by finite differences."""
    m, f, shape = model_fn()
    x = RNG.normal(size=shape).astype(np.float32)
    e = Explainer(m)
    np.testing.assert_allclose(e.predict(x), f(x), rtol=1e-5, atol=1e-6)  # the numpy copy is the model
    feeds = e._feeds(x)
    seed = e.seed_for(feeds, e.explained_tensor(), target)
    physical = np.asarray(expected_seed, np.float32)
    b = 1 if model_fn is sequence_first else 0
    np.testing.assert_array_equal(seed, np.moveaxis(physical, b, 0))
    got = e.attribute(x, method="gradient", target=target)
    np.testing.assert_allclose(got, fd_gradient(f, x, physical), rtol=1e-4, atol=1e-5)
    return e, x


# ----------------------------------------------------------------------------- (N, C)

def test_a_class_for_every_sample_seeds_that_class():
    s = np.zeros((N, C))
    s[:, 2] = 1
    check(classifier, 2, s)
    check(classifier, "2", s)


def test_one_class_per_sample_seeds_each_row_with_its_class():
    s = np.zeros((N, C))
    s[0, 1] = s[1, 0] = 1
    check(classifier, [1, 0], s)
    check(classifier, "1,0", s)


def test_pred_and_none_seed_the_predicted_class():
    m, f, shape = classifier()
    x = RNG.normal(size=shape).astype(np.float32)
    s = np.zeros((N, C))
    s[np.arange(N), f(x).argmax(1)] = 1
    e = Explainer(m)
    for target in (None, "pred"):
        np.testing.assert_allclose(e.attribute(x, target=target), fd_gradient(f, x, s), rtol=1e-4, atol=1e-5)


def test_a_float_array_is_the_seed_itself_for_the_batch_or_for_one_sample():
    s = RNG.normal(size=(N, C))
    check(classifier, s.astype(np.float32), s)
    one = RNG.normal(size=C)
    check(classifier, one.astype(np.float32), np.broadcast_to(one, (N, C)))


def test_a_npy_file_is_the_seed_it_holds(tmp_path):
    s = RNG.normal(size=(N, C))
    np.save(tmp_path / "seed.npy", s.astype(np.float32))
    check(classifier, str(tmp_path / "seed.npy"), s)
    assert parse_target(str(tmp_path / "seed.npy")).text.startswith("seed:")


# ----------------------------------------------------------------------------- (N, T, V)

def test_pos_seeds_one_token_at_one_position():
    s = np.zeros((N, T, V))
    s[:, 1, 3] = 1
    check(language_model, "pos:1:3", s)


def test_last_seeds_the_token_at_the_last_position():
    s = np.zeros((N, T, V))
    s[:, T - 1, 4] = 1
    check(language_model, "last:4", s)


def test_a_tuple_seeds_that_element_of_every_sample():
    s = np.zeros((N, T, V))
    s[:, 2, 0] = 1
    check(language_model, (2, 0), s)


@pytest.mark.parametrize("target", [5, 1, [0, 1], "3", None, "pred"])
def test_a_bare_class_or_the_prediction_on_a_language_model_output_is_an_error_showing_the_forms(target):
    """Before: target=5 meant position 5 summed over the vocabulary, None the argmax of
    rows summed over the vocabulary (a position): silent wrong answers."""
    m, _f, shape = language_model()
    with pytest.raises(OptionError, match="pos:T:V") as err:
        Explainer(m).attribute(RNG.normal(size=shape).astype(np.float32), target=target)
    assert "(batch, classes)" in str(err.value)


# ----------------------------------------------------------------------------- (T, N, C)

def test_step_seeds_one_frame_of_a_sequence_first_output():
    s = np.zeros((T, N, C))
    s[2, :, 1] = 1
    check(sequence_first, "step:2:1", s)


def test_steps_seed_every_frame_of_the_span_both_ends_included():
    s = np.zeros((T, N, C))
    s[1:4, :, 0] = 1
    check(sequence_first, "steps:1-3:0", s)


def test_steps_without_a_class_seed_each_frames_predicted_class():
    m, f, shape = sequence_first()
    x = RNG.normal(size=shape).astype(np.float32)
    y = f(x)
    s = np.zeros((T, N, C))
    for t in range(1, 3):
        for i in range(N):
            s[t, i, y[t, i].argmax()] = 1
    got = Explainer(m).attribute(x, target="steps:1-2")
    np.testing.assert_allclose(got, fd_gradient(f, x, s), rtol=1e-4, atol=1e-5)


def test_a_seed_array_of_a_sequence_first_output_is_given_in_its_own_layout():
    s = RNG.normal(size=(T, N, C))
    check(sequence_first, s.astype(np.float32), s)


@pytest.mark.parametrize("target, match", [("step:4:0", "frame 4 is out of range"),
                                           ("steps:0-1:3", "class 3 is out of range"),
                                           (1, "not \\(batch, classes\\)")])
def test_a_target_that_does_not_fit_a_sequence_first_output_is_a_typed_error(target, match):
    m, _f, shape = sequence_first()
    with pytest.raises((InputError, OptionError), match=match):
        Explainer(m).attribute(RNG.normal(size=shape).astype(np.float32), target=target)


# ----------------------------------------------------------------------------- (N, C, H, W)

def test_region_seeds_one_class_over_the_rectangle_x2_y2_exclusive():
    s = np.zeros((N, C, H, W))
    s[:, 2, 1:4, 0:2] = 1  # x1,y1,x2,y2 = 0,1,2,4
    check(segmenter, "region:0,1,2,4:2", s)


def test_region_without_a_class_seeds_every_class():
    s = np.zeros((N, C, H, W))
    s[:, :, 0:2, 3:5] = 1
    check(segmenter, "region:3,0,5,2", s)


def test_mask_seeds_the_non_zero_pixels_of_the_png(tmp_path):
    area = np.zeros((H, W), np.uint8)
    area[[0, 2, 5], [1, 4, 0]] = 255
    Image.fromarray(area).save(tmp_path / "m.png")
    s = np.zeros((N, C, H, W))
    s[:, 1, area > 0] = 1
    check(segmenter, f"mask:{tmp_path / 'm.png'}:1", s)
    s[:, :, area > 0] = 1
    check(segmenter, f"mask:{tmp_path / 'm.png'}", s)


# ----------------------------------------------------------------------------- misuse

@pytest.mark.parametrize("model_fn, target, match", [
    (classifier, "pos:0:1", "needs a \\(batch, positions, vocab\\)"),
    (classifier, "region:0,0,1,1", "needs a dense map"),
    (classifier, 3, "out of range: the output has 3 classes"),
    (classifier, [0, 1, 2], "3 targets for a batch of 2"),
    (classifier, np.ones((3, C), np.float32), "must have the explained output's shape"),
    (language_model, "pos:4:0", "position 4 is out of range"),
    (language_model, "last:5", "token 5 is out of range"),
    (segmenter, "region:0,0,6,2", "must lie in the 5x6 map"),
    (segmenter, "region:0,0,2,2:3", "class 3 is out of range"),
    (segmenter, "step:1", "needs a sequence output"),
    (segmenter, "pred", "not \\(batch, classes\\)"),
])
def test_a_target_that_does_not_fit_the_output_is_a_typed_error(model_fn, target, match):
    m, _f, shape = model_fn()
    with pytest.raises((InputError, OptionError), match=match):
        Explainer(m).attribute(RNG.normal(size=shape).astype(np.float32), target=target)


@pytest.mark.parametrize("text, match", [
    ("pos:3", "is not pos:T:V"),
    ("last:x", "is not last:V"),
    ("steps:5-2", "comes before"),
    ("steps:2", "is not steps:T0-T1"),
    ("step:a", "is not step:T"),
    ("region:1,2,3", "is not region:x1,y1,x2,y2"),
    ("region:5,5,5,9", "empty region"),
    ("mask:nowhere.png", "mask file not found"),
    ("cat", "is not a target; target forms"),
    ("3,x", "is not a target"),
])
def test_a_misspelt_target_is_an_option_error_naming_the_form(text, match):
    with pytest.raises((OptionError, InputError), match=match):
        parse_target(text)


def test_a_text_target_is_parsed_and_its_seed_on_a_bare_shape_asks_for_the_tokenizer():
    t = parse_target('text:"a great film"')
    assert t.reference == "a great film" and t == parse_target("text:a great film")
    with pytest.raises(OptionError, match="needs the tokenizer"):
        t.seed((N, 7, 8))


def test_a_malformed_box_is_a_syntax_error_not_a_promise():
    with pytest.raises(OptionError, match="is not box:x1,y1,x2,y2"):
        parse_target("box:1,2")


def test_an_empty_mask_is_an_error(tmp_path):
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(InputError, match="no non-zero pixel"):
        parse_target(f"mask:{tmp_path / 'empty.png'}")


def test_a_mask_of_another_size_than_the_map_is_an_error(tmp_path):
    Image.fromarray(np.full((H + 1, W), 255, np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="draw the mask at the map's size"):
        parse_target(f"mask:{tmp_path / 'big.png'}").seed((N, C, H, W))


def test_forms_name_every_available_form():
    for form in ("pred", "pos:T:V", "last:V", "step:T[:C]", "steps:T0-T1[:C]", "region:x1,y1,x2,y2[:C]",
                 "mask:FILE.png[:C]"):
        assert form in FORMS


# ----------------------------------------------------------------------------- the scorer

def test_the_scorer_scores_rows_by_sum_of_seed_times_output_in_any_layout():
    out = RNG.normal(size=(T, N, C))
    sc = TargetScorer("step:1:2", out, batch_axis=1)
    np.testing.assert_allclose(sc.scores(out, np.arange(N)), out[1, :, 2])
    # rows of sample 1 twice, then sample 0
    rows = RNG.normal(size=(T, 3, C))
    np.testing.assert_allclose(sc.scores(rows, [1, 1, 0]), rows[1, :, 2])
    probs = np.exp(rows) / np.exp(rows).sum(axis=2, keepdims=True)
    np.testing.assert_allclose(sc.scores(rows, [1, 1, 0], probability=True), probs[1, :, 2])


def test_the_scorer_keeps_the_predicted_class_of_the_original_inputs():
    out = np.array([[0.1, 2.0, 0.3], [3.0, 0.0, 1.0]])
    sc = TargetScorer(None, out)
    assert sc.explain_target([0, 1, 1]) == [1, 0, 0]
    np.testing.assert_allclose(sc.scores(out[::-1], [0, 1]), [out[1, 1], out[0, 0]])


def test_as_target_keeps_the_python_forms():
    assert as_target(3).text == "3"
    assert as_target([1, 2]).text == "1,2"
    assert as_target(np.array([1, 2])).text == "1,2"
    assert as_target(None).text == "pred"
    assert as_target((1, 2)).text == "index:1,2"
    with pytest.raises(OptionError, match="target forms"):
        as_target(True)


def test_cli_target_takes_every_form_and_matches_the_python_api(tmp_path):
    from click.testing import CliRunner

    from onnxplain import cli

    m, _f, shape = language_model()
    onnx.save(m, str(tmp_path / "lm.onnx"))
    x = RNG.normal(size=shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    runner = CliRunner()
    r = runner.invoke(cli.main, ["explain", str(tmp_path / "lm.onnx"), str(tmp_path / "x.npy"), "-t", "pos:2:1",
                                 "-o", str(tmp_path / "a.npy"), "-q"])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), Explainer(m).attribute(x, target="pos:2:1"), rtol=1e-6)
    for bad, words in (("5", "pos:T:V"), ("box:1,2,3,4", "no detector layout"), ("pos:x", "is not pos:T:V")):
        r = runner.invoke(cli.main, ["explain", str(tmp_path / "lm.onnx"), str(tmp_path / "x.npy"), "-t", bad,
                                     "-o", str(tmp_path / "b.npy")])
        assert r.exit_code == 2, (bad, r.output)
        assert words in r.output
    # evaluate and report: the default (the predicted class) does not fit an LM; said before any work
    for command, out in (("evaluate", "e.json"), ("report", "r.html")):
        r = runner.invoke(cli.main, [command, str(tmp_path / "lm.onnx"), str(tmp_path / "x.npy"), "--methods",
                                     "gradient", "-o", str(tmp_path / out), "-q"])
        assert r.exit_code == 2 and "pos:T:V" in r.output, r.output
    r = runner.invoke(cli.main, ["evaluate", str(tmp_path / "lm.onnx"), str(tmp_path / "x.npy"), "--methods",
                                 "gradient", "--metrics", "deletion", "-S", "deletion:steps=2", "-t", "last:2",
                                 "-o", str(tmp_path / "e.json"), "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.json").read_text())["target"] == "last:2"
