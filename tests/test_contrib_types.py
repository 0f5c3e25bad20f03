"""Types of com.microsoft quantized and ai.onnx.ml outputs, which onnx's shape inference
leaves unknown: every annotated shape is the one onnxruntime computes, and with the
annotation in the graph's inference the rules that need shapes after them work."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxplain import contrib_types, graph

import test_quantized as Q
from test_quantized import annotating_inference, quantized_zoo  # noqa: F401  (fixtures)


def _actual_shapes(model, feeds):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have:
                m.graph.output.append(helper.make_empty_tensor_value_info(o))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return {k: np.shape(v) for k, v in zip(names, sess.run(None, feeds)) if isinstance(v, np.ndarray)}


def _annotated_shapes(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    contrib_types.annotate(m)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    return {vi.name: graph.tensor_shape(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
            if vi.type.HasField("tensor_type")}


def _assert_shapes_agree(model, feeds):
    actual, annotated = _actual_shapes(model, feeds), _annotated_shapes(model)
    missing = [t for t in actual if annotated.get(t) is None]
    assert not missing, f"untyped after annotation: {missing[:5]}"
    for t, s in actual.items():
        a = annotated[t]
        assert len(a) == len(s) and all(d == e for d, e in zip(a, s) if isinstance(d, int)), (t, a, s)


@pytest.mark.parametrize("name", ["mlp", "resnet", "densenet"])
@pytest.mark.parametrize("variant", ["qoperator", "qoperator_per_channel"])
def test_every_tensor_of_a_qoperator_model_gets_the_shape_onnxruntime_computes(quantized_zoo, name, variant):
    shape, paths = quantized_zoo[name]
    model = onnx.load(str(paths[variant]))
    _assert_shapes_agree(model, {"input": Q._inputs(shape, 30)})


def test_every_tensor_of_an_sklearn_svm_pipeline_gets_its_shape():
    from sklearn.datasets import make_classification
    from sklearn.svm import SVC
    from skl2onnx import to_onnx

    x, y = make_classification(60, 5, n_informative=4, n_redundant=0, n_classes=3, random_state=0)
    x = x.astype(np.float32)
    svc = SVC().fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = to_onnx(svc, x[:1], options={id(svc): {"zipmap": False}})
    _assert_shapes_agree(model, {"X": x[:4]})


def test_a_model_without_such_operators_is_left_alone():
    m = Q._model([helper.make_node("Relu", ["x"], ["y"])], [Q._x("x", (2, 3))], "y", [])
    before = m.SerializeToString()
    assert contrib_types.annotate(m) == 0 and m.SerializeToString() == before


@pytest.mark.parametrize("variant", ["qoperator", "qoperator_per_channel"])
def test_with_the_annotation_a_qoperator_densenet_is_explained_white_box(quantized_zoo, variant,
                                                                         annotating_inference):
    shape, paths = quantized_zoo["densenet"]
    x = Q._inputs(shape, 21)
    classes = Q._middle_classes(paths[variant], x)
    ste = Q._gradients(str(paths[variant]), x, classes)
    ref = Q._gradients(str(paths["float"]), x, classes)
    rel, corr = Q._agreement(ste, ref)
    assert np.all(corr > 0.9), (rel, corr)


def test_with_the_annotation_sklearns_one_vs_rest_svm_scores_are_explained(annotating_inference):
    import test_rules_ml as M
    from sklearn.datasets import make_classification
    from sklearn.svm import SVC

    x, y = make_classification(80, 5, n_informative=4, n_redundant=0, n_classes=3, random_state=0)
    x = (x.astype(np.float32) * 2 + 1) / 3
    svc = SVC(kernel="rbf", gamma=0.3).fit(x, y)
    M.check(M.convert(svc, x), x[:5], "probabilities")
