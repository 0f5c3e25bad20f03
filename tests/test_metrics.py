"""Metrics as specifications: known answers on synthetic models, agreement with Captum's
infidelity and sensitivity_max on identical perturbations, and randomisation sanity."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer, metrics

MODELS = Path(__file__).resolve().parent.parent / "models"
REGION = (slice(2, 6), slice(1, 5))  # rows, columns of the evidence in a 10x10 image


def region_model(path, region=REGION, size=10, classes=1):
    """score = sum of the input over `region` (all channels): the evidence is known exactly.
    With classes=2 the second class scores the rest of the image at a small weight."""
    mask = np.zeros((1, 3, size, size), np.float32)
    mask[(0, slice(None)) + region] = 1.0
    inits = [numpy_helper.from_array(mask, "M"), numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 1], np.int64), "column")]
    nodes = [helper.make_node("Mul", ["x", "M"], ["xm"]), helper.make_node("ReduceSum", ["xm", "axes"], ["s4"]),
             helper.make_node("Reshape", ["s4", "column"], ["s" if classes == 2 else "y"])]
    if classes == 2:
        nodes += [helper.make_node("Mul", ["x", "M2"], ["xo"]), helper.make_node("ReduceSum", ["xo", "axes"], ["o4"]),
                  helper.make_node("Reshape", ["o4", "column"], ["o"]),
                  helper.make_node("Concat", ["s", "o"], ["y"], axis=1)]
        inits.append(numpy_helper.from_array(0.1 * (1.0 - mask), "M2"))
    out = "y"
    graph = helper.make_graph(nodes, "region", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             ["N", 3, size, size])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    e = Explainer(region_model(tmp_path_factory.mktemp("m") / "region.onnx"))
    x = np.random.default_rng(0).uniform(0.5, 1.0, (3, 3, 10, 10)).astype(np.float32)
    perfect = np.zeros_like(x)
    perfect[(slice(None), slice(None)) + REGION] = x[(slice(None), slice(None)) + REGION]
    rand = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    return e, x, perfect, rand


def test_perfect_explanation_beats_a_random_one_on_deletion_insertion_and_aopc(region):
    e, x, perfect, rand = region
    d_good, d_rand = (metrics.deletion(e, x, a, steps=20) for a in (perfect, rand))
    i_good, i_rand = (metrics.insertion(e, x, a, steps=20, baseline=0.0) for a in (perfect, rand))
    s_good, s_rand = (metrics.selectivity(e, x, a, patch=2, fill=0.0) for a in (perfect, rand))
    assert np.all(d_good.values < d_rand.values)
    assert np.all(i_good.values > i_rand.values)
    assert np.all(s_good.values > s_rand.values)
    # Deleting the 16 region pixels of 100 zeroes the score: from 20% on, the curve is 0.
    assert d_good.curve[:, 0] == pytest.approx(x[(slice(None), slice(None)) + REGION].sum((1, 2, 3)), rel=1e-5)
    assert np.allclose(d_good.curve[:, 4:], 0.0, atol=1e-5)
    assert d_good.curve.shape == (3, 21) and d_good.curve_x[-1] == 1.0


def test_road_ranks_the_perfect_explanation_above_a_random_one(region):
    e, _, _, rand = region
    # Imputation restores what neighbours predict, so the evidence must stand out from them.
    x = np.random.default_rng(2).uniform(0.0, 0.2, (3, 3, 10, 10)).astype(np.float32)
    x[(slice(None), slice(None)) + REGION] = 1.0
    perfect = np.zeros_like(x)
    perfect[(slice(None), slice(None)) + REGION] = 1.0
    good, bad = (metrics.road(e, x, a, fractions=(0.1, 0.3, 0.5)) for a in (perfect, rand))
    assert np.all(good.values > bad.values)
    assert np.all(good.extra["morf"] < bad.extra["morf"])


def test_noisy_linear_imputation_solves_the_neighbour_mean_system():
    # A linear ramp is harmonic: its removed pixels are recovered exactly without noise.
    ramp = np.add.outer(np.arange(12.0), 2 * np.arange(9.0))[..., None]
    removed = np.zeros((12, 9), bool)
    removed[3:8, 2:6] = True
    out = metrics.noisy_linear_imputation(ramp, removed, noise=0.0)
    assert np.allclose(out, ramp, atol=1e-4)


def test_deletion_of_two_classes_scores_probabilities(tmp_path):
    e = Explainer(region_model(tmp_path / "two.onnx", classes=2))
    x = np.random.default_rng(0).uniform(0.5, 1.0, (2, 3, 10, 10)).astype(np.float32)
    d = metrics.deletion(e, x, x, steps=5, target=0)
    assert np.all((d.curve >= 0) & (d.curve <= 1))


@pytest.fixture(scope="module")
def torch_cnn(exported):
    return exported("vgg", "torchscript")


def test_infidelity_agrees_with_captum_on_the_same_perturbations(torch_cnn):
    import torch
    from captum.attr import Saliency
    from captum.metrics import infidelity

    model, path = torch_cnn
    e = Explainer(path)
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    target = [1, 3]
    attr = e.attribute(x, method="gradient", target=target)
    noise = np.random.default_rng(5).normal(0, 0.1, size=(2 * 7, 3, 16, 16)).astype(np.float32)
    ours_fn = lambda xr: (noise, xr - noise)  # noqa: E731
    theirs_fn = lambda xr: (torch.from_numpy(noise), xr - torch.from_numpy(noise))  # noqa: E731
    for normalize in (False, True):
        ours = metrics.infidelity(e, x, attr, target=target, n_samples=7, perturb=ours_fn, normalize=normalize)
        ref = infidelity(model, theirs_fn, torch.from_numpy(x), torch.from_numpy(attr), target=target,
                         n_perturb_samples=7, normalize=normalize).numpy()
        assert ours.values == pytest.approx(ref, rel=1e-3, abs=1e-7)
    # Saliency(abs=False) is our gradient, so the attributions themselves agree too.
    sal = Saliency(model).attribute(torch.from_numpy(x), target=target, abs=False).numpy()
    assert np.allclose(sal, attr, atol=1e-5)


def test_max_sensitivity_agrees_with_captum_on_the_same_perturbations(torch_cnn):
    import torch
    from captum.attr import Saliency
    from captum.metrics import sensitivity_max

    model, path = torch_cnn
    e = Explainer(path)
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    target = [0, 4]
    shift = np.random.default_rng(7).uniform(-0.05, 0.05, size=(2 * 5, 3, 16, 16)).astype(np.float32)
    ours = metrics.max_sensitivity(e, x, "gradient", target=target, n_samples=5, radius=0.05,
                                   perturb=lambda xr, r: xr + shift)
    ref = sensitivity_max(Saliency(model).attribute, torch.from_numpy(x), n_perturb_samples=5, perturb_radius=0.05,
                          perturb_func=lambda xr, r: xr + torch.from_numpy(shift), target=target, abs=False).numpy()
    assert ours.values == pytest.approx(ref, rel=1e-3)
    assert np.all(ours.values > 0)


def test_randomizing_the_weights_decorrelates_the_gradient():
    e = Explainer(MODELS / "tiny_cnn.onnx")
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    layers = metrics.parameter_layers(e.source)
    assert [op for _, op, _ in layers] == ["Gemm", "Conv", "Conv"]  # output side first
    r = metrics.randomization(e, x, "gradient", points=3)
    assert r.curve.shape == (2, 3)
    assert np.all(r.curve[:, -1] < 0.5), r.curve  # every layer redrawn: little of the map survives
    # The same model unchanged would correlate perfectly: the comparison itself is sound.
    same = metrics.spearman(np.abs(e.attribute(x[:1])), np.abs(e.attribute(x[:1])))
    assert same == pytest.approx(1.0)


def test_continuity_is_zero_for_a_translation_invariant_explanation_and_positive_otherwise(region):
    e, x, _, _ = region
    flat = np.full_like(x, 0.7)  # constant images: translating changes nothing
    c = metrics.continuity(e, flat, "gradient", shifts=3)
    assert np.allclose(c.values, 0.0)
    c = metrics.continuity(e, x, "input_x_gradient", shifts=3)
    assert np.all(c.values > 0) and c.curve.shape == (3, 3) and np.all(c.extra["mean_jump"] <= c.values)


def test_evaluate_returns_every_metric_for_every_method(region):
    e, x, _, _ = region
    out = metrics.evaluate(e, x[:1], {"gradient": {}, "input_x_gradient": {}},
                           metrics=("deletion", "insertion", "selectivity", "infidelity", "max_sensitivity"),
                           settings={"deletion": {"steps": 10}, "insertion": {"steps": 10},
                                     "max_sensitivity": {"n_samples": 3}})
    assert set(out) == {"gradient", "input_x_gradient"}
    assert out["input_x_gradient"]["deletion"].mean < out["gradient"]["deletion"].mean
    for scores in out.values():
        assert all(np.all(np.isfinite(s.values)) for s in scores.values())


def test_unknown_metric_and_bad_options_are_clear_errors(region):
    from onnxplain.errors import OptionError

    e, x, perfect, _ = region
    with pytest.raises(OptionError, match="unknown metric"):
        metrics.evaluate(e, x, {"gradient": {}}, metrics=("nope",))
    with pytest.raises(OptionError, match="fractions"):
        metrics.road(e, x, perfect, fractions=(0.5, 1.0))


# ----------------------------------------------------------------------------- one map for all channels


@pytest.mark.parametrize("metric, kw", [("deletion", {"steps": 10}), ("insertion", {"steps": 10, "baseline": 0.0}),
                                        ("selectivity", {"patch": 2, "fill": 0.0}), ("road", {}),
                                        ("infidelity", {"n_samples": 4})])
def test_every_metric_scores_a_one_channel_map_as_that_map_on_every_channel(region, metric, kw):
    """CAM maps are (N, 1, H, W) for an (N, 3, H, W) input; before, every metric refused them."""
    e, x, perfect, _ = region
    cam = perfect.sum(axis=1, keepdims=True)
    expected = getattr(metrics, metric)(e, x, np.broadcast_to(cam, x.shape).copy(), **kw).values
    np.testing.assert_allclose(getattr(metrics, metric)(e, x, cam, **kw).values, expected, rtol=1e-12)
    np.testing.assert_allclose(getattr(metrics, metric)(e, x, cam[:, 0], **kw).values, expected, rtol=1e-12)


def test_a_map_of_another_shape_is_still_an_error_that_names_both_accepted_shapes(region):
    e, x, perfect, _ = region
    with pytest.raises(metrics.InputError, match=r"\(3, 1, 10, 10\)"):
        metrics.deletion(e, x, perfect[:, :, :5], steps=4)


def test_evaluate_scores_grad_cam_maps():
    e = Explainer(MODELS / "tiny_cnn.onnx")
    x = np.random.default_rng(3).normal(size=(2, 3, 32, 32)).astype(np.float32)
    out = metrics.evaluate(e, x, {"grad_cam": {}}, metrics=("deletion", "infidelity"),
                           settings={"deletion": {"steps": 5}, "infidelity": {"n_samples": 2}})
    assert all(np.all(np.isfinite(s.values)) for s in out["grad_cam"].values())


# ----------------------------------------------------------------------------- errors before work


@pytest.mark.parametrize("methods, settings, match", [
    ({"gradient": {}}, {"deletion": {"stepz": 3}}, "metric 'deletion' has no setting.* stepz; its settings: steps"),
    ({"gradient": {}}, {"nope": {}}, "unknown metric"),
    ({"gradient": {}, "integrated_gradients": {"n_stepz": 3}}, {}, "no option.* n_stepz"),
    ({"gradient": {}, "no_such_method": {}}, {}, "unknown method"),
    ({"gradient": {}}, {"selectivity": {"patch": 0}}, "patch=0 of metric 'selectivity' must be at least 1"),
])
def test_evaluate_rejects_every_bad_method_option_and_setting_before_any_work(region, monkeypatch, methods, settings,
                                                                              match):
    e, x, _, _ = region
    calls = []
    monkeypatch.setattr(Explainer, "attribute", lambda *a, **k: calls.append(1))
    with pytest.raises(metrics.OptionError, match=match):
        metrics.evaluate(e, x, methods, metrics=("deletion", "selectivity"), settings=settings)
    assert calls == []


def test_evaluate_refuses_road_on_inputs_that_are_not_images_before_any_work(monkeypatch):
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "rows",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(np.ones((6, 2), np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    calls = []
    monkeypatch.setattr(Explainer, "attribute", lambda *a, **k: calls.append(1))
    with pytest.raises(metrics.OptionError, match="ROAD .* needs image inputs"):
        metrics.evaluate(Explainer(m), np.ones((2, 6), np.float32), {"gradient": {}}, metrics=("deletion", "road"))
    assert calls == []


def test_setting_values_are_typed_by_their_default_with_the_words_they_take():
    assert metrics.parse_setting("deletion", "steps", "20") == 20
    assert metrics.parse_setting("insertion", "baseline", "Mean") == "mean"
    assert metrics.parse_setting("insertion", "baseline", "0.5") == 0.5
    assert metrics.parse_setting("road", "fractions", "0.2,0.4") == (0.2, 0.4)
    assert metrics.parse_setting("deletion", "probability", "false") is False
    for metric, key, value, match in (("deletion", "steps", "many", "must be an integer"),
                                      ("insertion", "baseline", "fog", "must be a number or blur, mean"),
                                      ("deletion", "stepz", "3", "its settings: steps"),
                                      ("infidelity", "perturb", "x", "Python function")):
        with pytest.raises(metrics.OptionError, match=match):
            metrics.parse_setting(metric, key, value)


# ----------------------------------------------------------------------------- targets other than a class


def test_a_position_target_is_scored_by_that_tokens_probability(tmp_path):
    """The metrics score what the attribution explains: token 3 at position 1 of a
    (batch, positions, vocab) output, not a class of a flattened row."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(6, 5)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "lm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    e = Explainer(m)
    x = rng.normal(size=(2, 4, 6)).astype(np.float32)
    y = x @ w
    p = np.exp(y[:, 1]) / np.exp(y[:, 1]).sum(axis=1, keepdims=True)
    scorer = metrics.Scorer(e, x, "pos:1:3")
    np.testing.assert_allclose(scorer.original, p[:, 3], rtol=1e-5)
    np.testing.assert_allclose(metrics.Scorer(e, x, "pos:1:3", probability=False).original, y[:, 1, 3], rtol=1e-5)
    out = metrics.evaluate(e, x, {"gradient": {}}, metrics=("deletion", "max_sensitivity"), target="pos:1:3",
                           settings={"deletion": {"steps": 4, "baseline": 0.0}, "max_sensitivity": {"n_samples": 2}})
    np.testing.assert_allclose(out["gradient"]["deletion"].curve[:, 0], p[:, 3], rtol=1e-5)
    # Deleting everything (baseline 0) leaves logits 0: a uniform 1/5 over the vocabulary.
    np.testing.assert_allclose(out["gradient"]["deletion"].curve[:, -1], 0.2, rtol=1e-5)


def test_a_frame_target_of_a_sequence_first_output_is_scored_on_its_batch_axis():
    """(T, N, C) output: the score of sample i is its own frames' predicted-class probabilities,
    read along axis 1, for the original inputs and for every perturbed copy."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                           helper.make_node("Transpose", ["h"], ["y"], perm=[1, 0, 2])], "seq",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "N", 3])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    e = Explainer(m)
    x = rng.normal(size=(3, 4, 6)).astype(np.float32)
    y = (x @ w).transpose(1, 0, 2)  # (T, N, C)
    p = np.exp(y) / np.exp(y).sum(axis=2, keepdims=True)
    expected = p[1:3].max(axis=2).sum(axis=0)  # frames 1 and 2, each its predicted class
    np.testing.assert_allclose(metrics.Scorer(e, x, "steps:1-2").original, expected, rtol=1e-5)
    out = metrics.evaluate(e, x, {"gradient": {}}, metrics=("deletion",), target="steps:1-2",
                           settings={"deletion": {"steps": 3}})
    np.testing.assert_allclose(out["gradient"]["deletion"].curve[:, 0], expected, rtol=1e-5)
