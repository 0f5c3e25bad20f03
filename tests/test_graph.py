"""Loading models safely and holding them as a layer-wise graph (onnxplain/graph.py)."""

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxplain.errors import InputError, ModelError
from onnxplain.graph import BATCH, MIN_OPSET, Graph, load, model_opset, read_model

MODELS = Path(__file__).resolve().parent.parent / "models"


# --- helpers shared with test_canonize.py -------------------------------------------------
def torch_export(module, example, *, dynamo: bool, opset: int | None = None, optimize: bool = True,
                 dynamic_spatial: bool = False) -> onnx.ModelProto:
    """Export an eval-mode torch module with input `input`, output `logits`, free batch axis.

    optimize=False keeps the graph as traced: BatchNormalization nodes, which both exporters
    otherwise fuse into the Conv before them, and constant subgraphs (TorchScript:
    TrainingMode.PRESERVE without constant folding; dynamo: no graph optimizer).
    """
    import torch

    module.eval()
    free = {0: "batch", 2: "height", 3: "width"} if dynamic_spatial else {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {i: torch.export.Dim(n, min=2) for i, n in free.items()}
            kwargs = {"optimize": optimize}
            if opset:
                kwargs["opset_version"] = opset
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=(dims,), verbose=False, **kwargs)
            return program.model_proto
        buf = io.BytesIO()
        kwargs = {} if optimize else {"training": torch.onnx.TrainingMode.PRESERVE}
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset or 17,
                          do_constant_folding=optimize, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": free, "logits": {0: "batch"}}, **kwargs)
        return onnx.load_from_string(buf.getvalue())


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: onnx.ModelProto, batch: int, seed: int = 0, sizes: dict | None = None) -> dict:
    """Standard-normal float32 inputs with the given batch; symbolic non-batch dims from sizes."""
    rng = np.random.default_rng(seed)
    consts = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in consts:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (sizes or {}).get(d.dim_param, 8)
                for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.normal(size=[batch] + dims[1:]).astype(np.float32)
    return feeds


def small_cnn():
    """A CNN touching operators whose signature changed between opsets 11 and 17."""
    import torch
    import torch.nn.functional as F

    class SmallCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(6)
            self.conv2 = torch.nn.Conv2d(6, 8, 3, stride=2)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            x = F.relu6(self.bn(self.conv1(x)))                 # Clip: attributes -> inputs at 11
            x = F.pad(x, (1, 0, 0, 1))                          # Pad: attributes -> inputs at 11
            x = F.max_pool2d(self.conv2(x), 2)
            x = x.mean(dim=(2, 3), keepdim=True)                # ReduceMean: axes -> input at 18
            x = x.squeeze(3).squeeze(2)                         # Squeeze: axes -> input at 13
            return F.log_softmax(self.fc(x), dim=1)            # (Log)Softmax: semantics at 13

    return SmallCNN().eval()


# --- loading --------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_models_from_both_torch_exporters_load_and_compute_the_same(dynamo):
    import torch

    net = small_cnn()
    x = torch.randn(3, 3, 16, 16)
    exported = torch_export(net, x, dynamo=dynamo)
    model = read_model(exported.SerializeToString())
    assert model_opset(model) >= MIN_OPSET
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(run(model, {"input": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)
    graph = Graph(model)
    assert graph.inputs == ["input"] and graph.outputs == ["logits"]


@pytest.mark.parametrize("opset", [11, 13, 15])
def test_old_opsets_are_converted_up_with_unchanged_outputs(opset):
    import torch

    original = torch_export(small_cnn(), torch.randn(2, 3, 16, 16), dynamo=False, opset=opset)
    assert model_opset(original) == opset
    model = read_model(original)
    assert model_opset(model) == MIN_OPSET
    for batch in (1, 3):
        feeds = random_feeds(original, batch)
        np.testing.assert_allclose(run(model, feeds)[0], run(original, feeds)[0], rtol=1e-5, atol=1e-5)


def test_reading_does_not_change_the_callers_model():
    original = onnx.load(str(MODELS / "tiny_cnn.onnx"))
    before = original.SerializeToString()
    read_model(original)
    assert original.SerializeToString() == before


def _tiny_bytes() -> bytes:
    return (MODELS / "tiny_cnn.onnx").read_bytes()


def _invalid_model() -> onnx.ModelProto:
    """Parses, but onnx.checker rejects it: Relu reads a tensor nothing defines."""
    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("make_source, cause", [
    (lambda d: d / "missing.onnx", "not found"),
    (lambda d: d, "not a file"),
    (lambda d: np.random.default_rng(0).bytes(4096), "not an ONNX model"),
    (lambda d: _tiny_bytes()[: len(_tiny_bytes()) // 2], "not an ONNX model"),
    (lambda d: _invalid_model().SerializeToString(), "not a valid ONNX graph"),
    (lambda d: b"", "no graph"),
    (lambda d: 42, "cannot read a model from int"),
], ids=["missing-file", "directory", "random-bytes", "truncated", "fails-checker", "empty", "wrong-type"])
def test_unreadable_models_raise_model_error_naming_the_cause(tmp_path, make_source, cause):
    with pytest.raises(ModelError, match=cause):
        read_model(make_source(tmp_path))


def test_a_truncated_model_file_raises_model_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(_tiny_bytes()[:3000])
    with pytest.raises(ModelError, match="cut.onnx is not an ONNX model"):
        read_model(path)


def _save_with_external_weights(folder: Path) -> tuple[Path, onnx.ModelProto]:
    """tiny_cnn with every initializer in weights.bin next to the model file."""
    model = onnx.load(str(MODELS / "tiny_cnn.onnx"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)  # makes `model` refer to the file too
    return path, onnx.load(str(MODELS / "tiny_cnn.onnx"))


def test_external_data_in_the_models_own_folder_loads(tmp_path):
    path, original = _save_with_external_weights(tmp_path / "m")
    assert (tmp_path / "m" / "weights.bin").stat().st_size > 1000
    model = read_model(path)
    feeds = random_feeds(original, 2)
    np.testing.assert_allclose(run(model, feeds)[0], run(original, feeds)[0], rtol=1e-6, atol=1e-6)


def _point_external_data_at(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("where, cause", [
    ("outside", "outside the model's folder"),
    ("absolute", "absolute"),
    ("missing", "not found"),
])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, where, cause):
    path, _ = _save_with_external_weights(tmp_path / "m")
    secret = tmp_path / "secret"
    secret.write_bytes((tmp_path / "m" / "weights.bin").read_bytes())  # readable, if it were allowed
    location = {"outside": "../secret", "absolute": str(secret), "missing": "nothing.bin"}[where]
    _point_external_data_at(path, location)
    with pytest.raises(ModelError, match=cause):
        read_model(path)


def test_external_data_cannot_be_read_from_bytes():
    path_model = onnx.load(str(MODELS / "tiny_cnn.onnx"))
    onnx.external_data_helper.convert_model_to_external_data(path_model, location="w.bin", size_threshold=0)
    with pytest.raises(ModelError, match="external data"):
        read_model(path_model.SerializeToString())


# --- the Graph representation -------------------------------------------------------------
def test_graph_orders_nodes_topologically_even_if_the_file_does_not():
    model = onnx.load(str(MODELS / "tiny_cnn.onnx"))
    shuffled = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    graph = Graph(model)
    seen = {"input"} | set(graph.initializers)
    for node in graph.nodes:
        assert all(i in seen for i in node.input if i), node.name
        seen.update(node.output)
    assert [n.op_type for n in graph.nodes][:3] == ["Conv", "BatchNormalization", "Relu"]
    assert len({n.name for n in graph.nodes}) == len(graph.nodes)  # every node is named, uniquely


def test_graph_rejects_a_cycle_by_naming_the_tensors():
    graph = helper.make_graph([helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    with pytest.raises(ModelError, match="cycle.*a, b"):
        Graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_graph_holds_initializers_as_numpy_and_shapes_with_symbolic_batch():
    graph = load(MODELS / "tiny_cnn.onnx")
    weight = graph.initializers["conv1.weight"]
    assert isinstance(weight, np.ndarray) and weight.dtype == np.float32 and weight.shape[1:] == (3, 3, 3)
    assert graph.constant("conv1.weight") is weight
    assert graph.shape("input") == ("batch", 3, 32, 32)
    assert graph.shape("/conv1/Conv_output_0") == ("batch", weight.shape[0], 32, 32)
    assert graph.shape("logits")[0] == "batch"
    assert graph.shape("conv1.weight") == weight.shape
    assert graph.is_float("input") and graph.elem_type("input") == TensorProto.FLOAT
    assert graph.input_shapes() == {"input": ("batch", 3, 32, 32)}
    names = graph.tensor_names()
    assert names[0] == "input" and names[-1] == "logits"
    conv = graph.producer["/conv1/Conv_output_0"]
    assert conv.op_type == "Conv" and [n.op_type for n in graph.consumers[conv.output[0]]] == ["BatchNormalization"]


def test_graph_reads_constant_nodes_as_constants():
    graph = load(MODELS / "mnist_cnn.onnx")
    constants = [n.output[0] for n in graph.nodes if n.op_type == "Constant"]
    assert constants and all(isinstance(graph.constant(c), np.ndarray) for c in constants)
    assert graph.constant("input") is None


def test_specialize_fixes_every_dimension_but_the_batch():
    import torch

    model = read_model(torch_export(small_cnn(), torch.randn(2, 3, 16, 16), dynamo=False, dynamic_spatial=True))
    graph = Graph(model)
    assert graph.shape("input") == ("batch", 3, "height", "width")
    special = graph.specialize({"input": (5, 3, 20, 24)})
    assert special.shape("input") == (BATCH, 3, 20, 24)
    conv1 = next(n for n in special.nodes if n.op_type == "Conv")
    assert special.shape(conv1.output[0]) == (BATCH, 6, 20, 24)
    # (Past the exporter's Pad, whose amounts a constant subgraph computes, shape inference
    # needs canonize.fold_constants: tests/test_canonize.py checks that part.)
    assert graph.shape("input") == ("batch", 3, "height", "width")  # the original is untouched
    with pytest.raises(InputError, match="rank 4"):
        graph.specialize({"input": (5, 3, 20)})


def test_load_reads_every_shipped_model():
    for name in ("tiny_cnn", "mnist_cnn", "efficientnet_lite0"):
        graph = load(MODELS / f"{name}.onnx")
        assert graph.inputs == ["input"] and graph.outputs == ["logits"] and graph.opset == 17
        assert graph.shape("logits")[0] == "batch"
