"""Black-box methods: occlusion, feature ablation, RISE, meaningful perturbation,
KernelSHAP and LIME, checked against Captum, against exact Shapley values, on planted
evidence, and on scikit-learn models (tree ensembles have no backward rule)."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer, OptionError
from onnxplain.methods.surrogate import kernel_shap_coalitions, lime_coalitions

captum_attr = pytest.importorskip("captum.attr")


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "m", inputs, outputs,
                              initializer=[numpy_helper.from_array(np.asarray(v, dtype=np.float32), k)
                                           for k, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def linear_model(weights, bias=0.5):
    """y = x @ W + b on (batch, F) rows, one output."""
    w = np.asarray(weights, dtype=np.float32).reshape(-1, 1)
    return _model([helper.make_node("Gemm", ["x", "W", "b"], ["y"])], [_vi("x", ["batch", len(w)])],
                  [_vi("y", ["batch", 1])], [("W", w), ("b", [bias])])


def additive_model(f):
    """y = sum_j (a_j x_j^2 + sin(x_j)): additive, not linear."""
    a = np.linspace(-1, 1, f).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Mul", ["sq", "a"], ["asq"]),
             helper.make_node("Sin", ["x"], ["s"]), helper.make_node("Add", ["asq", "s"], ["t"]),
             helper.make_node("ReduceSum", ["t", "axes"], ["y"], keepdims=1)]
    m = _model(nodes, [_vi("x", ["batch", f])], [_vi("y", ["batch", 1])], [("a", a)])
    m.graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
    return m, lambda x: (a * x * x + np.sin(x)).sum(-1)


def interaction_model():
    """y = x0 x1 + x2 x3 x4 - x5 on 6 features: Shapley values differ from any linear fit."""
    nodes = [helper.make_node("Split", ["x"], [f"c{i}" for i in range(6)], axis=1, num_outputs=6),
             helper.make_node("Mul", ["c0", "c1"], ["p01"]), helper.make_node("Mul", ["c2", "c3"], ["p23"]),
             helper.make_node("Mul", ["p23", "c4"], ["p234"]), helper.make_node("Add", ["p01", "p234"], ["s"]),
             helper.make_node("Sub", ["s", "c5"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "m", [_vi("x", ["batch", 6])], [_vi("y", ["batch", 1])]),
                          opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m, lambda x: x[..., 0] * x[..., 1] + x[..., 2] * x[..., 3] * x[..., 4] - x[..., 5]


def region_model(shape, region):
    """y = sum(x * R) with R the indicator of `region` (slices over H, W): only the region counts."""
    r = np.zeros(shape, dtype=np.float32)
    r[(slice(None),) + region] = 1.0
    nodes = [helper.make_node("Mul", ["x", "R"], ["xr"]),
             helper.make_node("ReduceSum", ["xr", "axes"], ["s"], keepdims=1),
             helper.make_node("Flatten", ["s"], ["y"], axis=1)]
    m = _model(nodes, [_vi("x", ["batch", *shape])], [_vi("y", ["batch", 1])], [("R", r[None])])
    m.graph.initializer.append(numpy_helper.from_array(np.arange(1, len(shape) + 1, dtype=np.int64), "axes"))
    return m


def brute_force_shapley(f, x, base):
    """Exact Shapley values of v(S) = f(x on S, base elsewhere), by enumerating subsets."""
    m = x.shape[-1]
    phi = np.zeros(m)
    for j in range(m):
        others = [i for i in range(m) if i != j]
        for k in range(m):
            for s in itertools.combinations(others, k):
                w = math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m)
                z = base.copy()
                z[list(s)] = x[list(s)]
                without = f(z)
                z[j] = x[j]
                phi[j] += w * (f(z) - without)
    return phi


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    import zoo

    model = zoo.build("vgg").eval()
    path = zoo.export(model, tmp_path_factory.mktemp("bb") / "vgg.onnx", "torchscript")
    return model, Explainer(path)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    import zoo

    model = zoo.build("mlp").eval()
    path = zoo.export(model, tmp_path_factory.mktemp("bb") / "mlp.onnx", "torchscript")
    return model, Explainer(path)


# ----------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize("window,strides", [((3, 4, 4), (1, 2, 2)), ((1, 3, 5), (1, 2, 3)), ((3, 16, 16), None),
                                            ((2, 5, 3), (1, 4, 3)), ((3, 2, 2), None),
                                            ((3, 6, 4), None)])
def test_occlusion_equals_captum_occlusion_elementwise(vgg, window, strides):
    model, ex = vgg
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    given = {} if strides is None else {"strides": strides}  # None: the default, half the window
    strides = tuple(max(1, w // 2) for w in window) if strides is None else strides
    ours = ex.attribute(x, method="occlusion", target=1, window=window, baseline=0.3, **given)
    ref = captum_attr.Occlusion(model).attribute(torch.tensor(x), sliding_window_shapes=window,
                                                 strides=strides, baselines=0.3, target=1,
                                                 perturbations_per_eval=256).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_occlusion_on_tabular_rows_with_strides_not_dividing_the_width_equals_captum(mlp):
    model, ex = mlp
    x = np.random.default_rng(1).normal(size=(3, 12)).astype(np.float32)
    ours = ex.attribute(x, method="occlusion", target=[0, 2, 4], window=5, strides=3)
    ref = captum_attr.Occlusion(model).attribute(torch.tensor(x), sliding_window_shapes=(5,), strides=3,
                                                 target=[0, 2, 4]).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


def test_occlusion_spatial_window_covers_all_channels_and_stays_under_a_tiny_memory_budget(vgg, tmp_path):
    model, ex = vgg
    x = np.random.default_rng(2).normal(size=(1, 3, 16, 16)).astype(np.float32)
    small = Explainer(ex.source, memory_budget=1 << 16)  # a few rows per run
    ours = small.attribute(x, method="occlusion", target=0, window=(4, 4), strides=(2, 2))
    ref = ex.attribute(x, method="occlusion", target=0, window=(3, 4, 4), strides=(1, 2, 2))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- feature ablation


def test_feature_ablation_equals_captum_feature_ablation_with_per_sample_groups(vgg):
    model, ex = vgg
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    mask = rng.integers(0, 12, size=(2, 3, 16, 16))
    ours = ex.attribute(x, method="feature_ablation", target=2, feature_mask=mask, baseline=-0.5)
    ref = captum_attr.FeatureAblation(model).attribute(torch.tensor(x), feature_mask=torch.tensor(mask),
                                                       target=2, baselines=-0.5).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_feature_ablation_of_tabular_rows_is_one_feature_per_column_as_captum(mlp):
    model, ex = mlp
    x = np.random.default_rng(4).normal(size=(2, 12)).astype(np.float32)
    ours = ex.attribute(x, method="feature_ablation", target=3)
    ref = captum_attr.FeatureAblation(model).attribute(torch.tensor(x), target=3).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- KernelSHAP


def test_kernel_shap_is_exact_on_a_linear_model_with_sampled_coalitions():
    w = np.array([1.0, -2.0, 0.5, 3.0, 0.0, -1.0, 2.0, 0.25])
    ex = Explainer(linear_model(w))
    x = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)
    phi = ex.attribute(x, method="kernel_shap", n_samples=60, baseline=0.2, target=0)  # 60 < 2^8: sampled
    np.testing.assert_allclose(phi, w * (x - 0.2), rtol=1e-4, atol=1e-4)


def test_kernel_shap_equals_brute_force_shapley_values_on_an_additive_model():
    model, f = additive_model(7)
    ex = Explainer(model)
    x = np.random.default_rng(6).normal(size=(2, 7)).astype(np.float32)
    base = np.full(7, -0.3)
    phi = ex.attribute(x, method="kernel_shap", n_samples=50, baseline=-0.3, target=0)
    for i in range(2):
        np.testing.assert_allclose(phi[i], brute_force_shapley(f, x[i].astype(np.float64), base), rtol=1e-4,
                                   atol=1e-4)


def test_kernel_shap_enumerating_all_coalitions_gives_exact_shapley_values_with_interactions():
    model, f = interaction_model()
    ex = Explainer(model)
    x = np.random.default_rng(7).normal(size=(2, 6)).astype(np.float32)
    phi = ex.attribute(x, method="kernel_shap", target=0)  # default: 2^6 = 64 coalitions, enumerated
    for i in range(2):
        exact = brute_force_shapley(f, x[i].astype(np.float64), np.zeros(6))
        np.testing.assert_allclose(phi[i], exact, rtol=1e-4, atol=1e-4)
    # efficiency: the values add up to f(x) - f(baseline)
    np.testing.assert_allclose(phi.sum(1), f(x.astype(np.float64)), rtol=1e-4, atol=1e-4)


def _feed(samples):
    """A Captum perturb_func that yields our coalitions, so both fit the same samples."""

    def gen(_inputs, **_kw):
        for z in samples:
            yield torch.tensor(z[None].astype(np.int64))

    return gen


def test_kernel_shap_equals_captum_kernel_shap_on_the_same_coalitions(mlp):
    model, ex = mlp
    x = np.random.default_rng(8).normal(size=(2, 12)).astype(np.float32)
    groups = np.repeat(np.arange(6), 2)
    z, _ = kernel_shap_coalitions(6, 40, np.random.default_rng(11))
    ours = ex.attribute(x, method="kernel_shap", target=1, feature_mask=groups, n_samples=40, seed=11,
                        baseline=0.1)
    ks = captum_attr.KernelShap(model)
    ks.perturb_func = _feed(z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ks.attribute(torch.tensor(x), target=1, feature_mask=torch.tensor(groups)[None], n_samples=40,
                           baselines=0.1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("surrogate,tol", [("linear", 1e-4), ("lasso", 1e-4)])
def test_lime_equals_captum_lime_on_the_same_samples(mlp, surrogate, tol):
    from captum._utils.models.linear_model import SkLearnLasso, SkLearnLinearRegression

    model, ex = mlp
    x = np.random.default_rng(9).normal(size=(2, 12)).astype(np.float32)
    groups = np.arange(12) // 3
    z = lime_coalitions(4, 30, np.random.default_rng(12))
    ours = ex.attribute(x, method="lime", target=4, feature_mask=groups, n_samples=30, seed=12,
                        surrogate=surrogate, baseline=0.0)
    interpretable = SkLearnLinearRegression() if surrogate == "linear" else SkLearnLasso(alpha=0.01)
    lime = captum_attr.Lime(model, interpretable_model=interpretable, perturb_func=_feed(z))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lime.attribute(torch.tensor(x), target=4, feature_mask=torch.tensor(groups)[None], n_samples=30,
                             baselines=0.0).numpy()
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_kernel_shap_and_lime_on_images_use_grid_superpixels_and_are_seeded(vgg):
    _, ex = vgg
    x = np.random.default_rng(10).normal(size=(1, 3, 16, 16)).astype(np.float32)
    a = ex.attribute(x, method="kernel_shap", target=0, grid=4, n_samples=100)
    b = ex.attribute(x, method="kernel_shap", target=0, grid=4, n_samples=100)
    np.testing.assert_array_equal(a, b)
    # one value per 4x4 superpixel, shared by its channels
    assert len(np.unique(a)) <= 16 and np.all(a[:, 0] == a[:, 2])
    seg = ex.attribute(x, method="lime", target=0, superpixels="slic", grid=3, n_samples=60)
    assert seg.shape == x.shape and np.all(np.isfinite(seg))


# ----------------------------------------------------------------------------- RISE


def test_rise_saliency_peaks_inside_the_only_region_the_score_depends_on():
    region = (slice(18, 26), slice(4, 12))
    ex = Explainer(region_model((1, 32, 32), region))
    x = np.ones((1, 1, 32, 32), dtype=np.float32)
    sal = ex.attribute(x, method="rise", target=0, n_masks=500, cells=8, seed=1)[0, 0]
    peak = np.unravel_index(np.argmax(sal), sal.shape)
    assert 18 <= peak[0] < 26 and 4 <= peak[1] < 12
    far = np.ones_like(sal, dtype=bool)
    far[10:34, 0:20] = False  # the region and 8 pixels around it
    # far from the region a mask is independent of the score: E[score m] / p = E[score] = 64 p
    assert abs(sal[far].mean() - 32) < 2
    assert sal[region].mean() > sal[far].mean() + 3


def test_rise_is_seeded_and_its_expectation_is_the_score_over_p_keep():
    ex = Explainer(linear_model(np.ones(5), bias=0.0))
    x = np.ones((1, 5), dtype=np.float32)
    a = ex.attribute(x, method="rise", n_masks=4000, p_keep=0.5, seed=3)
    np.testing.assert_array_equal(a, ex.attribute(x, method="rise", n_masks=4000, p_keep=0.5, seed=3))
    assert not np.array_equal(a, ex.attribute(x, method="rise", n_masks=4000, p_keep=0.5, seed=4))
    # E[score * m_j] / p = E[sum_i m_i m_j] / p = 1 + (5 - 1) p for tabular Bernoulli masks
    np.testing.assert_allclose(a, 1 + 4 * 0.5, rtol=0.05)


# ----------------------------------------------------------------------------- meaningful perturbation


@pytest.mark.parametrize("gradient", ["exact", "spsa"])
def test_meaningful_perturbation_finds_the_planted_evidence_region(gradient):
    region = (slice(8, 16), slice(18, 26))
    ex = Explainer(region_model((1, 32, 32), region))
    x = np.zeros((1, 1, 32, 32), dtype=np.float32)
    x[(0, 0) + region] = 1.0
    x += np.random.default_rng(0).normal(0, 0.05, size=x.shape).astype(np.float32)
    sal = ex.attribute(x, method="meaningful_perturbation", target=0, gradient=gradient, mask_size=8,
                       sigma=3.0, median_size=5, n_iter=150 if gradient == "exact" else 200)[0, 0]
    inside = np.zeros_like(sal, dtype=bool)
    inside[region] = True
    assert sal[inside].mean() > 0.5
    assert sal[inside].mean() > 3 * sal[~inside].mean()


def test_meaningful_perturbation_coordinate_gradient_agrees_with_the_exact_one():
    region = (slice(2, 6), slice(4, 8))
    ex = Explainer(region_model((1, 8, 8), region))
    x = np.random.default_rng(1).uniform(size=(1, 1, 8, 8)).astype(np.float32)
    opts = dict(target=0, mask_size=4, sigma=1.0, median_size=3, n_iter=20, noise=0.0)
    exact = ex.attribute(x, method="meaningful_perturbation", gradient="exact", **opts)
    coord = ex.attribute(x, method="meaningful_perturbation", gradient="coordinate", **opts)
    np.testing.assert_allclose(coord, exact, atol=1e-3)


# ----------------------------------------------------------------------------- scikit-learn models


@pytest.fixture(scope="module")
def sklearn_models(tmp_path_factory):
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] - x[:, 3] > 0).astype(int)  # features 0 and 3 decide
    folder = tmp_path_factory.mktemp("skl")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, clf in [("forest", RandomForestClassifier(n_estimators=20, max_depth=5, random_state=0)),
                          ("mlp", MLPClassifier(hidden_layer_sizes=(16,), max_iter=800, random_state=0))]:
            clf.fit(x, y)
            onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}},
                          target_opset={"": 17, "ai.onnx.ml": 3})
            path = folder / f"{name}.onnx"
            onnx.save(onx, str(path))
            out[name] = path
    return out, x[:12]


@pytest.mark.parametrize("name", ["forest", "mlp"])
@pytest.mark.parametrize("method", ["occlusion", "feature_ablation", "kernel_shap", "lime", "rise",
                                    "meaningful_perturbation"])
def test_sklearn_models_are_explained_by_every_black_box_method_and_rank_the_deciding_features(
        sklearn_models, name, method):
    paths, x = sklearn_models
    ex = Explainer(paths[name])
    opts = {"n_iter": 60} if method == "meaningful_perturbation" else {}
    a = ex.attribute(x, method=method, output="probabilities", target=1, **opts)
    assert a.shape == x.shape and np.all(np.isfinite(a))
    if method in ("kernel_shap", "feature_ablation", "occlusion"):
        top = np.argsort(-np.abs(a).mean(0))[:2]
        assert set(top) == {0, 3}


def test_kernel_shap_of_a_tree_ensemble_adds_up_to_the_probability_change(sklearn_models):
    paths, x = sklearn_models
    ex = Explainer(paths["forest"])
    phi = ex.attribute(x, method="kernel_shap", output="probabilities", target=1)
    p = ex.predict(x, output="probabilities")[:, 1]
    p0 = ex.predict(np.zeros_like(x), output="probabilities")[:, 1]
    np.testing.assert_allclose(phi.sum(1), p - p0, atol=1e-4)


def test_cli_explains_a_tree_ensemble_with_kernel_shap_into_an_array(sklearn_models, tmp_path):
    from click.testing import CliRunner

    from onnxplain import cli

    paths, x = sklearn_models
    np.save(tmp_path / "x.npy", x)
    for method in ("kernel_shap", "occlusion", "feature_ablation"):
        out = tmp_path / f"{method}.npy"
        result = CliRunner().invoke(cli.main, ["explain", str(paths["forest"]), str(tmp_path / "x.npy"), "-m", method,
                                               "--output", "probabilities", "-t", "1", "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        expected = Explainer(paths["forest"]).attribute(x, method=method, output="probabilities", target=1)
        np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-7)


def test_meaningful_perturbation_falls_back_to_finite_differences_without_backward_rules(sklearn_models):
    paths, x = sklearn_models
    ex = Explainer(paths["forest"])
    with pytest.raises(OptionError, match="gradient=exact.*TreeEnsembleClassifier"):
        ex.attribute(x, method="meaningful_perturbation", output="probabilities", target=1, gradient="exact")


# ----------------------------------------------------------------------------- option errors


@pytest.mark.parametrize("method,options,message", [
    ("occlusion", {"window": (3, 20, 4)}, "larger than the input"),
    ("occlusion", {"window": (3, 4, 4), "strides": (1, 5, 5)}, "must not exceed the window"),
    ("occlusion", {"window": (4, 4, 4, 4)}, "one size per non-batch axis"),
    ("rise", {"p_keep": 0.0}, r"\(0, 1\]"),
    ("rise", {"p_keep": 1.5}, r"\(0, 1\]"),
    ("kernel_shap", {"n_samples": 10}, "n_samples >= the number of features"),
    ("feature_ablation", {"feature_mask": np.zeros((5, 5), dtype=int)}, "does not fit input"),
    ("lime", {"surrogate": "forest"}, "must be one of"),
    ("meaningful_perturbation", {"gradient": "magic"}, "must be one of"),
])
def test_impossible_options_raise_one_clear_option_error(vgg, method, options, message):
    _, ex = vgg
    x = np.zeros((1, 3, 16, 16), dtype=np.float32)
    with pytest.raises(OptionError, match=message):
        ex.attribute(x, method=method, target=0, **options)


def test_black_box_methods_refuse_a_layer_with_a_clear_error(vgg):
    _, ex = vgg
    layer = ex.graph.nodes[2].output[0]
    with pytest.raises(OptionError, match="cannot attribute to a layer"):
        ex.attribute(np.zeros((1, 3, 16, 16), dtype=np.float32), method="occlusion", layer=layer, target=0)


def test_blur_perturbation_of_tabular_rows_is_refused():
    ex = Explainer(linear_model(np.ones(4)))
    with pytest.raises(OptionError, match="tabular rows"):
        ex.attribute(np.ones((1, 4), dtype=np.float32), method="meaningful_perturbation", perturbation="blur")
