"""Canonization: every rewrite leaves the model's outputs unchanged and has its structural effect."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_graph import random_feeds, run, small_cnn, torch_export

from onnxplain import canonize as C
from onnxplain.graph import Graph, read_model

MODELS = Path(__file__).resolve().parent.parent / "models"
EXPORTERS = {"torchscript": False, "dynamo": True}


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Equal outputs (rtol = atol = 1e-5) on random inputs with batch 1 and batch 3."""
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    onnx.checker.check_model(after, full_check=True)
    for batch in (1, 3):
        feeds = random_feeds(before, batch, seed=batch)
        for want, got in zip(run(before, feeds), run(after, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def applied(rewrite, model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return rewrite(copy)


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    """inputs/outputs: {name: shape}, float32, first axis the symbolic batch "N"."""
    def infos(d):  # a rank-0 "train" input is Dropout's boolean training_mode
        return [helper.make_tensor_value_info(k, TensorProto.BOOL if k == "train" else TensorProto.FLOAT, v)
                for k, v in d.items()]
    graph = helper.make_graph(nodes, "g", infos(inputs), infos(outputs),
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    # Outputs given without a shape get the inferred one, as an exporter would write it.
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def randn(*shape, seed=0, positive=False):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return np.abs(x) + 0.5 if positive else x


def bn_params(prefix, c, seed):
    return {f"{prefix}.scale": randn(c, seed=seed), f"{prefix}.bias": randn(c, seed=seed + 1),
            f"{prefix}.mean": randn(c, seed=seed + 2), f"{prefix}.var": randn(c, seed=seed + 3, positive=True)}


def bn_node(prefix, x, y):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{p}" for p in ("scale", "bias", "mean", "var")],
                            [y], epsilon=1e-3)


# --- torch models, exported once per exporter -----------------------------------------
def _bn_zoo():
    """BatchNormalization in every position: after and before Conv (grouped too) and Linear."""
    import torch

    class BNZoo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.bn0 = torch.nn.BatchNorm2d(3)                      # before a Conv with zero pads: folds
            self.c1 = torch.nn.Conv2d(3, 6, 3)
            self.bn1 = torch.nn.BatchNorm2d(6)                      # after a Conv: folds
            self.bn2 = torch.nn.BatchNorm2d(6)                      # before a grouped Conv: folds
            self.c2 = torch.nn.Conv2d(6, 4, 3, groups=2, bias=False)
            self.bn3 = torch.nn.BatchNorm2d(4)                      # before a padded Conv: stays
            self.c3 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.fc1 = torch.nn.Linear(4 * 6 * 6, 8)
            self.bn4 = torch.nn.BatchNorm1d(8)                      # after a Linear: folds
            self.bn5 = torch.nn.BatchNorm1d(8)                      # before a Linear: folds
            self.fc2 = torch.nn.Linear(8, 5)
            for m in self.modules():
                if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                    m.weight.data.normal_()
                    m.bias.data.normal_()
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            x = torch.relu(self.bn1(self.c1(self.bn0(x))))
            x = torch.relu(self.c2(self.bn2(x)))
            x = torch.relu(self.c3(self.bn3(x)))
            x = torch.relu(self.bn4(self.fc1(x.flatten(1))))
            return self.fc2(self.bn5(x))

    return BNZoo().eval()


def _stem():
    """Constant arithmetic, a shape-dependent reshape and TF-style explicit padding before Convs."""
    import torch
    import torch.nn.functional as F

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.c1 = torch.nn.Conv2d(3, 4, 3, stride=2)
            self.c2 = torch.nn.Conv2d(4, 4, 3, groups=4)
            self.fc = torch.nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            x = self.c1(F.pad(x, (0, 1, 0, 1)))
            x = torch.clamp(self.c2(F.pad(x, (1, 1, 1, 1))), 0.0, 6.0)
            x = x + torch.arange(5, dtype=torch.float32) * 0.1
            return self.fc(x.reshape(x.shape[0], -1))

    return Stem().eval()


@pytest.fixture(scope="module", params=list(EXPORTERS))
def bn_zoo(request):
    import torch
    return torch_export(_bn_zoo(), torch.randn(2, 3, 10, 10), dynamo=EXPORTERS[request.param], optimize=False)


@pytest.fixture(scope="module", params=list(EXPORTERS))
def stem(request):
    import torch
    return read_model(torch_export(_stem(), torch.randn(2, 3, 11, 11), dynamo=EXPORTERS[request.param], optimize=False))


# --- fold_constants ------------------------------------------------------------------------
def test_fold_constants_evaluates_constant_subgraphs_into_initializers():
    nodes = [
        helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(randn(4, seed=1))),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Mul", ["a", "two"], ["a2"]),
        helper.make_node("Add", ["a2", "w"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["y"]),
    ]
    w = randn(4, seed=2)
    model = make_model(nodes, {"x": ["N", 4]}, {"y": ["N", 4]}, {"w": w})
    folded = applied(C.fold_constants, model)
    assert_same_outputs(model, folded)
    assert ops(folded) == {"Mul": 1}
    values = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_allclose(values[folded.graph.node[0].input[1]], randn(4, seed=1) * 2 + w, rtol=1e-6)
    assert "w" not in values  # the parameter only the folded node read is gone


def test_fold_constants_folds_static_shapes_but_never_the_batch():
    nodes = [
        helper.make_node("Shape", ["x"], ["s_all"]),                          # depends on the batch
        helper.make_node("Shape", ["x"], ["s_tail"], start=1),                # (3, 4): static
        helper.make_node("ReduceProd", ["s_tail"], ["n"], keepdims=1),
        helper.make_node("Concat", ["s_all", "n"], ["s_both"], axis=0),
        helper.make_node("Slice", ["s_both", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "n"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    model = make_model(nodes, {"x": ["N", 3, 4]}, {"y": ["N", 12]},
                       {"zero": np.array([0]), "one": np.array([1])}, opset=17)
    folded = applied(C.fold_constants, model)
    assert_same_outputs(model, folded)
    shapes = [n for n in folded.graph.node if n.op_type == "Shape"]
    assert len(shapes) == 1 and not [a for a in shapes[0].attribute if a.name == "start"]
    assert "ReduceProd" not in ops(folded)


def test_fold_constants_never_freezes_a_declared_batch_of_one():
    # The Explainer frees the batch axis of every input, so Shape(x)[0] must stay computed.
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])]
    model = make_model(nodes, {"x": [1, 3]}, {"y": [1, 3]})
    assert ops(applied(C.fold_constants, model))["Shape"] == 1


def test_fold_constants_keeps_random_nodes_and_oversized_results(monkeypatch):
    nodes = [
        helper.make_node("RandomNormal", [], ["r"], shape=[1, 4], seed=1.0),
        helper.make_node("Mul", ["r", "zero"], ["r0"]),
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Add", ["x", "r0"], ["x1"]),
        helper.make_node("Mul", ["x1", "big"], ["y"]),
    ]
    model = make_model(nodes, {"x": ["N", 4]}, {"y": ["N", 4]},
                       {"zero": np.zeros(1, np.float32), "shape": np.array([1, 4])})
    monkeypatch.setattr(C, "MAX_FOLD_BYTES", 8)
    folded = applied(C.fold_constants, model)
    assert ops(folded)["RandomNormal"] == 1 and ops(folded)["Mul"] == 2
    assert ops(folded)["ConstantOfShape"] == 1
    assert_same_outputs(model, folded)
    monkeypatch.setattr(C, "MAX_FOLD_BYTES", 64 * 1024**2)
    assert "ConstantOfShape" not in ops(applied(C.fold_constants, model))


def test_fold_constants_removes_dead_code_but_never_a_graph_output():
    nodes = [
        helper.make_node("Relu", ["x"], ["unused"]),
        helper.make_node("Sigmoid", ["unused"], ["unused2"]),
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(randn(3, seed=3))),
    ]
    model = make_model(nodes, {"x": ["N", 3]}, {"y": ["N", 3], "k": [3]})
    folded = applied(C.fold_constants, model)
    assert ops(folded) == {"Relu": 1, "Constant": 1}
    assert_same_outputs(model, folded)


def test_fold_constants_on_exported_graphs_leaves_no_constant_node(stem):
    folded = applied(C.fold_constants, stem)
    assert_same_outputs(stem, folded)
    assert "Constant" not in ops(folded)
    assert len(folded.graph.node) < len(stem.graph.node)


# --- fold_batchnorm ------------------------------------------------------------------------
def test_fold_batchnorm_folds_every_bn_next_to_a_linear_layer(bn_zoo):
    assert ops(bn_zoo)["BatchNormalization"] == 6
    # The dynamo exporter computes a missing Conv bias at run time: fold constants first.
    folded = applied(C.fold_batchnorm, applied(C.fold_constants, bn_zoo))
    assert_same_outputs(bn_zoo, folded)
    # Only the BN before the padded Conv stays: its shift would reach the zero padding.
    assert ops(folded)["BatchNormalization"] == 1
    bn = next(n for n in folded.graph.node if n.op_type == "BatchNormalization")
    assert bn.input[1].endswith("bn3.weight")
    assert len(folded.graph.initializer) < len(bn_zoo.graph.initializer)


def test_canonize_folds_the_batchnorm_of_exported_models(bn_zoo):
    canon = C.canonize(read_model(bn_zoo))
    assert_same_outputs(bn_zoo, canon)
    assert ops(canon)["BatchNormalization"] == 1 and "Constant" not in ops(canon)


@pytest.mark.parametrize("where", ["after", "before"])
@pytest.mark.parametrize("trans_b, alpha, beta, bias_shape", [
    (1, 1.0, 1.0, (5,)), (0, 0.7, 1.3, (1, 5)), (1, 2.0, 0.5, None), (0, 1.0, 1.0, ())])
def test_fold_batchnorm_into_gemm_in_either_order(where, trans_b, alpha, beta, bias_shape):
    w = randn(*((5, 6) if trans_b else (6, 5)), seed=4)
    inits = {"w": w, **bn_params("bn", 5 if where == "after" else 6, seed=10)}
    gemm_in = ["h" if where == "before" else "x", "w"]
    if bias_shape is not None:
        inits["c"] = randn(*bias_shape, seed=5)
        gemm_in.append("c")
    gemm = helper.make_node("Gemm", gemm_in, ["g" if where == "after" else "y"],
                            transB=trans_b, alpha=alpha, beta=beta)
    nodes = [gemm, bn_node("bn", "g", "y")] if where == "after" else [bn_node("bn", "x", "h"), gemm]
    model = make_model(nodes, {"x": ["N", 6]}, {"y": ["N", 5]}, inits)
    folded = applied(C.fold_batchnorm, model)
    assert ops(folded) == {"Gemm": 1}
    assert_same_outputs(model, folded)


@pytest.mark.parametrize("group, pads, auto_pad, folds", [
    (1, [0, 0, 0, 0], None, True),
    (2, [0, 0, 0, 0], None, True),
    (4, None, "VALID", True),
    (1, [1, 0, 0, 0], None, False),
    (1, None, "SAME_UPPER", False),
])
def test_fold_batchnorm_before_conv_only_without_padding(group, pads, auto_pad, folds):
    attrs = {"group": group, "kernel_shape": [3, 3]}
    if pads is not None:
        attrs["pads"] = pads
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    inits = {"w": randn(8, 4 // group, 3, 3, seed=6), "b": randn(8, seed=7), **bn_params("bn", 4, seed=20)}
    nodes = [bn_node("bn", "x", "h"), helper.make_node("Conv", ["h", "w", "b"], ["y"], **attrs)]
    model = make_model(nodes, {"x": ["N", 4, 7, 7]}, {"y": None}, inits)
    folded = applied(C.fold_batchnorm, model)
    assert ("BatchNormalization" in ops(folded)) != folds
    assert_same_outputs(model, folded)


def test_fold_batchnorm_after_conv_without_bias_and_1d():
    inits = {"w": randn(5, 2, 3, seed=8), **bn_params("bn", 5, seed=30)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[2, 1]), bn_node("bn", "c", "y")]
    model = make_model(nodes, {"x": ["N", 2, 9]}, {"y": None}, inits)
    folded = applied(C.fold_batchnorm, model)
    assert ops(folded) == {"Conv": 1} and len(folded.graph.node[0].input) == 3
    assert_same_outputs(model, folded)


@pytest.mark.parametrize("case", ["alone", "conv-output-read-twice", "stats-not-constant",
                                  "conv-output-is-graph-output"])
def test_fold_batchnorm_leaves_a_bn_it_cannot_fold(case):
    inits = {"w": randn(4, 3, 1, 1, seed=9), **bn_params("bn", 4, seed=40)}
    inputs, outputs = {"x": ["N", 3, 5, 5]}, {"y": None}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             bn_node("bn", "r", "h"), helper.make_node("Relu", ["h"], ["y"])]
    if case == "conv-output-read-twice":
        nodes = [nodes[0], bn_node("bn", "c", "h"), helper.make_node("Add", ["h", "c"], ["y"])]
    elif case == "stats-not-constant":
        nodes = [nodes[0], bn_node("bn", "c", "y")]
        del inits["bn.mean"]
        inputs["bn.mean"] = [4]
    elif case == "conv-output-is-graph-output":
        nodes = [nodes[0], bn_node("bn", "c", "y")]
        outputs["c"] = None
    model = make_model(nodes, inputs, outputs, inits)
    folded = applied(C.fold_batchnorm, model)
    assert ops(folded) == ops(model)
    if case != "stats-not-constant":
        assert_same_outputs(model, folded)


# --- merge_pad_into_conv -------------------------------------------------------------------
@pytest.mark.parametrize("pads, value, mode, axes, merges", [
    ([0, 0, 1, 2, 0, 0, 2, 1], None, None, None, True),
    ([0, 0, 1, 0, 0, 0, 1, 3], 0.0, "constant", None, True),
    ([1, 0, 2, 1], None, None, [2, -1], True),                          # opset-18 axes input
    ([0, 0, 1, 1, 0, 0, 1, 1], 0.5, None, None, False),                 # non-zero pad value
    ([0, 0, 1, 1, 0, 0, 1, 1], None, "reflect", None, False),
    ([0, 1, 1, 1, 0, 0, 1, 1], None, None, None, False),                # pads the channels
    ([0, 0, -1, 0, 0, 0, 0, 0], None, None, None, False),               # crops
])
def test_merge_pad_into_conv(pads, value, mode, axes, merges):
    channels = 3 + pads[1] + pads[5] if len(pads) == 8 else 3
    inits = {"pads": np.array(pads), "w": randn(4, channels, 3, 3, seed=11), "b": randn(4, seed=12)}
    pad_in = ["x", "pads", "value" if value is not None else ""]
    if value is not None:
        inits["value"] = np.array(value, dtype=np.float32)
    if axes is not None:
        inits["axes"] = np.array(axes)
        pad_in.append("axes")
    pad = helper.make_node("Pad", pad_in, ["p"], **({"mode": mode} if mode else {}))
    conv = helper.make_node("Conv", ["p", "w", "b"], ["y"], pads=[1, 0, 0, 1], strides=[2, 1])
    model = make_model([pad, conv], {"x": ["N", 3, 8, 9]}, {"y": None}, inits, opset=18)
    merged = applied(C.merge_pad_into_conv, model)
    assert ("Pad" not in ops(merged)) == merges
    assert_same_outputs(model, merged)


def test_merge_pad_into_conv_leaves_a_pad_that_feeds_two_nodes():
    inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]), "w": randn(2, 3, 3, 3, seed=13)}
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("Conv", ["p", "w"], ["c"]),
             helper.make_node("ReduceMean", ["p"], ["m"], keepdims=1), helper.make_node("Add", ["c", "m"], ["y"])]
    model = make_model(nodes, {"x": ["N", 3, 6, 6]}, {"y": None}, inits)
    assert ops(applied(C.merge_pad_into_conv, model)) == ops(model)


def test_merge_pad_into_conv_on_exported_graphs(stem):
    folded = applied(C.fold_constants, stem)
    merged = applied(C.merge_pad_into_conv, folded)
    assert "Pad" in ops(folded) and "Pad" not in ops(merged)
    assert_same_outputs(stem, merged)


def test_canonized_graphs_have_static_shapes_but_the_batch():
    # The exporter computes Pad amounts with a constant subgraph that shape inference cannot
    # see through; once canonized, every tensor but the batch axis has a static shape.
    import torch

    model = read_model(torch_export(small_cnn(), torch.randn(2, 3, 16, 16), dynamo=False, dynamic_spatial=True))
    special = Graph(C.canonize(model)).specialize({"input": (5, 3, 20, 24)})
    for node in special.nodes:
        for name in node.output:
            shape = special.shape(name)
            assert shape is not None and shape[0] == "N" and all(isinstance(d, int) for d in shape[1:]), (name, shape)


# --- drop_passthrough -----------------------------------------------------------------------
def test_drop_passthrough_removes_identity_and_inference_dropout_only():
    nodes = [
        helper.make_node("Identity", ["x"], ["i1"]),
        helper.make_node("Identity", ["i1"], ["i2"]),
        helper.make_node("Dropout", ["i2"], ["d1"]),
        helper.make_node("Dropout", ["d1", "ratio", "off"], ["d2", "unused_mask"]),
        helper.make_node("Dropout", ["d2"], ["d3", "mask"]),                   # mask read: stays
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Dropout", ["d3", "ratio", "train"], ["d4"]),          # training mode unknown: stays
        helper.make_node("Add", ["d4", "maskf"], ["s"]),
        helper.make_node("Identity", ["s"], ["y"]),                            # a graph output: stays
    ]
    model = make_model(nodes, {"x": ["N", 4], "train": []}, {"y": ["N", 4]},
                       {"ratio": np.array(0.5, np.float32), "off": np.array(False)})
    dropped = applied(C.drop_passthrough, model)
    assert ops(dropped) == {"Dropout": 2, "Cast": 1, "Add": 1, "Identity": 1}
    feeds = {"x": randn(3, 4), "train": np.array(False)}
    np.testing.assert_allclose(run(dropped, feeds)[0], run(model, feeds)[0], rtol=1e-6)
    assert next(n for n in dropped.graph.node if n.output[0] == "d3").input[0] == "x"


# --- the shipped models ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return {name: read_model(MODELS / f"{name}.onnx") for name in ("tiny_cnn", "mnist_cnn", "efficientnet_lite0")}


@pytest.mark.parametrize("rewrite", C.REWRITES + [C.canonize], ids=lambda r: r.__name__)
@pytest.mark.parametrize("name", ["tiny_cnn", "mnist_cnn", "efficientnet_lite0"])
def test_every_rewrite_leaves_shipped_model_outputs_unchanged(shipped, name, rewrite):
    assert_same_outputs(shipped[name], applied(rewrite, shipped[name]))


def test_canonize_simplifies_the_shipped_models(shipped):
    tiny, mnist, effnet = (C.canonize(shipped[n]) for n in ("tiny_cnn", "mnist_cnn", "efficientnet_lite0"))
    assert "BatchNormalization" not in ops(tiny) and len(tiny.graph.node) == 8
    assert "Constant" not in ops(mnist)
    assert ops(mnist)["Shape"] == 1  # Reshape(batch, -1) still reads the batch at run time
    assert not {"Pad", "Constant", "ConstantOfShape", "Transpose", "Cast", "Slice"} & set(ops(effnet))
    assert ops(effnet)["Conv"] == 49 and len(effnet.graph.node) < len(shipped["efficientnet_lite0"].graph.node) // 4


def test_canonize_is_idempotent_and_does_not_touch_its_argument(shipped):
    model = shipped["efficientnet_lite0"]
    before = model.SerializeToString()
    once = C.canonize(model)
    assert model.SerializeToString() == before
    twice = C.canonize(once)
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]
    assert [o.name for o in once.graph.input] == ["input"] and [o.name for o in once.graph.output] == ["logits"]


def test_canonize_keeps_ir3_models_valid():
    # IR 3 wants every initializer listed as a graph input, the ones canonize creates too.
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(randn(3, seed=5))),
             helper.make_node("Add", ["x", "k"], ["y"])]
    model = make_model(nodes, {"x": ["N", 3]}, {"y": ["N", 3]})
    model.ir_version = 3
    canon = C.canonize(model)
    assert "Constant" not in ops(canon) and {vi.name for vi in canon.graph.input} == {"x", "k"}
    assert_same_outputs(model, canon)
