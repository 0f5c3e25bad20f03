"""Gradient rules of ai.onnx.ml operators on scikit-learn models converted by skl2onnx.

Each gradient is checked twice: by central finite differences computed in float64 on the
float32 model (onnxruntime's ml kernels output float32) at several step sizes, passing at
the best one; and against the analytic gradient written in numpy from the fitted
scikit-learn estimator's own parameters.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxplain import Explainer
from onnxplain.compile import compile_explainer
from onnxplain.errors import ModelError
from onnxplain.graph import Graph, read_model
from onnxplain.methods.gradients import GRADIENT

skl2onnx = pytest.importorskip("skl2onnx")
from sklearn.datasets import make_classification, make_regression  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import Normalizer, StandardScaler  # noqa: E402
from sklearn.svm import SVC, SVR  # noqa: E402

STEPS = (1e-2, 1e-3, 1e-4)


def convert(est, x, zipmap=False):
    options = {id(est): {"zipmap": False}} if hasattr(est, "classes_") and not zipmap else None
    if hasattr(est, "steps") and not zipmap:
        options = {id(est.steps[-1][1]): {"zipmap": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skl2onnx.to_onnx(est, x[:1], options=options)


def finite_differences(model, x, output, seed, h):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fp = sess.run([output], {name: xp})[0].astype(np.float64)
        fm = sess.run([output], {name: xm})[0].astype(np.float64)
        # the steps actually taken in float32
        out[idx] = float((seed * (fp - fm)).sum() / (np.float64(xp[idx]) - np.float64(xm[idx])))
    return out


def gradient(model, x, output):
    """The compiled gradient explainer of seed . output at x, with a random seed."""
    graph = Graph(read_model(model))
    spec = compile_explainer(graph.specialize({graph.inputs[0]: x.shape}), GRADIENT, [graph.inputs[0]], output)
    sess = ort.InferenceSession(spec.model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run([output], {
        graph.inputs[0]: x})[0]
    seed = np.random.default_rng(0).normal(size=y.shape).astype(np.float32)
    got = sess.run([spec.attributions[graph.inputs[0]]], {graph.inputs[0]: x, spec.seed: seed})[0]
    return got.astype(np.float64), seed


def check(model, x, output, want=None, tol=2e-3):
    """onnxplain's gradient of seed . output against finite differences (best step) and,
    where given, the analytic `want(seed)`. Returns the seed and the gradient."""
    got, seed = gradient(model, x, output)
    scale = max(np.abs(got).max(), 1e-6)
    errs = [np.abs(finite_differences(model, x, output, seed.astype(np.float64), h) - got).max() / scale
            for h in STEPS]
    assert min(errs) < tol, f"finite differences disagree: relative errors {errs} at steps {STEPS}"
    if want is not None:
        np.testing.assert_allclose(got, want(seed.astype(np.float64)), rtol=1e-4, atol=1e-5 * scale)
    return seed, got


@pytest.fixture(scope="module")
def classification():
    x, y = make_classification(80, 5, n_informative=4, n_redundant=0, n_classes=3, random_state=0)
    return x.astype(np.float32) * 2 + 1, y


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_scaler_then_logistic_regression_probabilities(classification):
    x, y = classification
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    sc, lr = pipe.steps[0][1], pipe.steps[1][1]
    xt = x[:6]

    def want(seed):
        p = _softmax(((xt - sc.mean_) / sc.scale_) @ lr.coef_.T + lr.intercept_)
        return (p * (seed - (seed * p).sum(axis=1, keepdims=True))) @ lr.coef_ / sc.scale_

    check(convert(pipe, x), xt, "probabilities", want)


def test_binary_logistic_regression_probabilities(classification):
    x, y = classification
    lr = LogisticRegression().fit(x, (y == 1).astype(int))
    xt = x[:6]

    def want(seed):
        p = 1 / (1 + np.exp(-(xt @ lr.coef_.T + lr.intercept_)))  # (N, 1): class 1
        return (seed[:, 1:] - seed[:, :1]) * p * (1 - p) * lr.coef_

    check(convert(lr, x), xt, "probabilities", want)


@pytest.mark.parametrize("post", ["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO"])
def test_linear_classifier_post_transforms(classification, post):
    x, y = classification
    model = convert(LogisticRegression(max_iter=500).fit(x, y), x)
    node = next(n for n in model.graph.node if n.op_type == "LinearClassifier")
    for a in node.attribute:
        if a.name == "post_transform":
            a.s = post.encode()
    check(model, x[:5], "probabilities", tol=5e-3)


@pytest.mark.parametrize("op", ["LinearClassifier", "LinearRegressor"])
def test_probit_post_transform_is_the_inverse_normal_cdf(op):
    # y = Phi^-1(z) for raw scores z in (0, 1): dy/dz = sqrt(2 pi) exp(y^2 / 2).
    from onnx import TensorProto, helper
    from scipy.stats import norm

    w, c = np.array([[0.3, -0.2], [0.1, 0.25]]), np.array([0.5, 0.4])
    common = dict(coefficients=w.reshape(-1).tolist(), intercepts=c.tolist(), post_transform="PROBIT")
    if op == "LinearClassifier":
        node = helper.make_node(op, ["X"], ["L", "Y"], domain="ai.onnx.ml", classlabels_ints=[0, 1], **common)
        outs = [helper.make_tensor_value_info("L", TensorProto.INT64, [None]),
                helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 2])]
    else:
        node = helper.make_node(op, ["X"], ["Y"], domain="ai.onnx.ml", targets=2, **common)
        outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 2])]
    g = helper.make_graph([node], "p", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])], outs)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    x = np.array([[0.1, 0.2], [0.5, -0.4], [-0.6, 0.3]], np.float32)

    def want(seed):
        z = x.astype(np.float64) @ w.T + c
        return (seed * np.sqrt(2 * np.pi) * np.exp(norm.ppf(z) ** 2 / 2)) @ w

    check(model, x, "Y", want, tol=5e-3)


def test_linear_regression():
    x, t = make_regression(60, 4, n_targets=2, random_state=1)
    x = x.astype(np.float32)
    reg = LinearRegression().fit(x, t)
    check(convert(reg, x), x[:5], "variable", lambda seed: seed @ reg.coef_)


@pytest.mark.parametrize("kernel", ["linear", "rbf", "poly", "sigmoid"])
def test_svm_regressor_kernels(kernel):
    x, t = make_regression(50, 4, random_state=2)
    x = (x / 3).astype(np.float32)
    svr = SVR(kernel=kernel, gamma=0.3, coef0=0.5, degree=3, C=10.0).fit(x, t / 50)
    xt = x[:5]

    def want(seed):
        sv, a = svr.support_vectors_, svr.dual_coef_.reshape(-1)
        dots = xt.astype(np.float64) @ sv.T
        if kernel == "linear":
            return seed * (a @ sv)
        if kernel == "rbf":
            k = np.exp(-0.3 * ((xt[:, None, :] - sv[None]) ** 2).sum(-1))
            return seed * (-0.6) * ((a * k).sum(1, keepdims=True) * xt - (a * k) @ sv)
        inner = 0.3 * dots + 0.5
        local = 3 * inner**2 if kernel == "poly" else 1 - np.tanh(inner) ** 2
        return seed * 0.3 * ((a * local) @ sv)

    check(convert(svr, x), xt, "variable", want)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_binary_svm_classifier_decision_scores(classification, kernel):
    x, y = classification
    x = x / 3
    svc = SVC(kernel=kernel, gamma=0.3).fit(x, (y == 1).astype(int))
    xt = x[:5]

    def want(seed):
        sv, a = svc.support_vectors_, svc.dual_coef_.reshape(-1)
        if kernel == "linear":
            dd = np.tile(a @ sv, (len(xt), 1))
        else:
            k = np.exp(-0.3 * ((xt[:, None, :] - sv[None]) ** 2).sum(-1))
            dd = -0.6 * ((a * k).sum(1, keepdims=True) * xt - (a * k) @ sv)
        # onnxruntime's scores are [decision, -decision]
        return (seed[:, :1] - seed[:, 1:]) * dd

    check(convert(svc, x), xt, "probabilities", want)


@pytest.mark.parametrize("kernel", ["linear", "rbf", "poly"])
def test_multiclass_svm_classifier_one_vs_one_decision_values(classification, kernel):
    # The SVMClassifier's own output: one decision value per pair of classes.
    x, y = classification
    x = x / 3
    svc = SVC(kernel=kernel, gamma=0.3, coef0=0.5, degree=2, decision_function_shape="ovo").fit(x, y)
    model = convert(svc, x)
    node = next(n for n in model.graph.node if n.op_type == "SVMClassifier")
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[1], onnx.TensorProto.FLOAT, [None, 3]))
    check(model, x[:5], node.output[1])


def test_multiclass_svm_one_vs_rest_scores(classification):
    # skl2onnx builds sklearn's one-vs-rest scores from the pairwise values with standard
    # operators and ArrayFeatureExtractor: votes (piecewise constant) plus bounded
    # confidences (differentiable).
    x, y = classification
    x = x / 3
    svc = SVC(kernel="rbf", gamma=0.3).fit(x, y)
    model = convert(svc, x)
    np.testing.assert_allclose(
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            ["probabilities"], {"X": x[:5]})[0], svc.decision_function(x[:5]), rtol=1e-4, atol=1e-5)
    check(model, x[:5], "probabilities")


def test_array_feature_extractor_adds_repeated_columns_back():
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("ArrayFeatureExtractor", ["X", "idx"], ["Y"], domain="ai.onnx.ml")
    g = helper.make_graph([node], "afe", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 3])],
                          initializer=[numpy_helper.from_array(np.array([2, 0, 2], np.int64), "idx")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    x = np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32)

    def want(seed):
        out = np.zeros((3, 4))
        out[:, 0] = seed[:, 1]
        out[:, 2] = seed[:, 0] + seed[:, 2]
        return out

    check(model, x, "Y", want)


@pytest.mark.parametrize("make", ["LinearSVC", "RidgeClassifier"])
def test_binary_linear_classifiers_read_through_array_feature_extractor(classification, make):
    # skl2onnx: LinearClassifier scores [-d, d], then ArrayFeatureExtractor keeps d; the
    # scores' width is not typed by onnx, so the column is scattered back at run time.
    from sklearn.linear_model import RidgeClassifier
    from sklearn.svm import LinearSVC

    x, y = classification
    est = (LinearSVC() if make == "LinearSVC" else RidgeClassifier()).fit(x, (y == 1).astype(int))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = skl2onnx.to_onnx(est, x[:1])
    assert [n.op_type for n in model.graph.node] == ["LinearClassifier", "ArrayFeatureExtractor"]
    check(model, x[:5], "probabilities", lambda seed: seed * est.coef_)


def test_svm_classifier_with_platt_probabilities_is_refused_by_name(classification):
    x, y = classification
    svc = SVC(probability=True, random_state=0).fit(x, (y == 1).astype(int))
    with pytest.raises(ModelError, match="Platt"):
        gradient(convert(svc, x), x[:2], "probabilities")


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_normalizer(norm):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    x[:, 0] = np.abs(x).max(axis=1) + 0.5  # the largest value of each row is positive and unique
    est = Normalizer(norm=norm).fit(x)
    xt = x.astype(np.float64)

    def want(seed):
        if norm == "l2":
            n = np.linalg.norm(xt, axis=1, keepdims=True)
            y = xt / n
            return (seed - y * (seed * y).sum(1, keepdims=True)) / n
        if norm == "l1":
            n = np.abs(xt).sum(1, keepdims=True)
            return (seed - np.sign(xt) * (seed * xt / n).sum(1, keepdims=True)) / n
        n = xt.max(1, keepdims=True)
        e = (xt == n).astype(float)
        return (seed - e * (seed * xt / n).sum(1, keepdims=True)) / n

    check(convert(est, x), x, "variable", want)


@pytest.mark.parametrize("zipmap", [False, True])
def test_the_explainer_explains_the_probabilities_of_a_pipeline_as_skl2onnx_writes_it(classification, zipmap):
    # skl2onnx's default output is a ZipMap (a sequence of maps): the probability tensor
    # before it is explained, by default and through the public API.
    x, y = classification
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    sc, lr = pipe.steps[0][1], pipe.steps[1][1]
    xt = x[:4]
    e = Explainer(convert(pipe, x, zipmap=zipmap))
    got = e.attribute(xt, method="gradient", target=2)
    p = _softmax(((xt - sc.mean_) / sc.scale_) @ lr.coef_.T + lr.intercept_)
    seed = np.zeros_like(p)
    seed[:, 2] = 1
    want = (p * (seed - (seed * p).sum(axis=1, keepdims=True))) @ lr.coef_ / sc.scale_
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_feature_vectorizer_splits_the_gradient_between_its_inputs():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Mul", ["X", "two"], ["X2"]),
             helper.make_node("FeatureVectorizer", ["X", "X2"], ["Y"], domain="ai.onnx.ml", inputdimensions=[3, 3])]
    g = helper.make_graph(nodes, "fv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 3])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 6])],
                          initializer=[numpy_helper.from_array(np.float32(2.0), "two")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    x = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
    check(model, x, "Y", lambda seed: seed[:, :3] + 2 * seed[:, 3:])
