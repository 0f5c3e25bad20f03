"""`onnxplain inspect` tells, per method family, which operators on the explained path have
no rule — inside subgraphs too — and analyses token models from their embedding output."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from test_control_flow import if_model

from onnxplain import cli
from onnxplain.graph import Graph, find_embeddings, read_model

FAMILIES = {"gradient", "guided_backprop", "deconvnet", "lrp.epsilon", "lrp.epsilon_plus", "lrp.epsilon_gamma_box",
            "lrp.epsilon_alpha2_beta1", "deep_taylor", "excitation_backprop", "contrastive_excitation_backprop",
            "deeplift"}


def inspect_json(model: onnx.ModelProto, tmp_path) -> dict:
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(cli.main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def with_mystery(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """The model with an operator no family has a rule for: replacing the then-branch's
    Tanh (where="branch") or applied to the output (where="top")."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    if where == "branch":
        branch = next(a.g for a in m.graph.node[2].attribute if a.name == "then_branch")
        branch.node[-1].op_type, branch.node[-1].domain = "Mystery", "com.example"
    return m


def test_inspect_counts_operators_inside_if_branches(tmp_path):
    report = inspect_json(with_mystery(if_model(), "branch"), tmp_path)
    assert FAMILIES <= set(report["unsupported"])
    for family, missing in report["unsupported"].items():
        assert "Mystery" in missing, family
    assert report["analysed_from"] == {"tensors": ["x"], "kind": "float inputs"}


def test_inspect_reports_deeplift_cannot_enter_if_branches(tmp_path):
    report = inspect_json(if_model(), tmp_path)
    assert report["unsupported"]["deeplift"] == ["If"]  # and nothing inside the branches
    assert report["unsupported"]["gradient"] == [] and report["unsupported"]["lrp.epsilon"] == []


def token_model(mystery: bool, table_2d: bool = True):
    """ids (N, T) int64 -> Gather from a constant (V, D) table -> [Mystery] -> ReduceMean -> Gemm."""
    r = np.random.default_rng(0)
    table = r.normal(size=(10, 4)).astype(np.float32)
    if not table_2d:
        table = table.reshape(10, 2, 2)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"])]
    src = "emb"
    if mystery:
        nodes.append(helper.make_node("Mystery", ["emb"], ["m"], domain="com.example"))
        src = "m"
    nodes += [helper.make_node("ReduceMean", [src], ["pooled"], axes=[1], keepdims=0),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "W"], ["y"])]
    g = helper.make_graph(nodes, "tok", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(table, "table"),
                           numpy_helper.from_array(r.normal(size=(4, 3)).astype(np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                          ir_version=8)
    return m


def test_find_embeddings_names_the_gather_from_a_constant_table_by_int_ids():
    assert find_embeddings(Graph(read_model(token_model(False)))) == ["emb"]
    # A 3-D table is not an embedding table by the definition (a constant 2-D float table).
    assert find_embeddings(Graph(read_model(token_model(False, table_2d=False)))) == []


def test_inspect_analyses_a_token_model_from_its_embedding_output(tmp_path):
    report = inspect_json(token_model(True), tmp_path)
    assert report["embeddings"] == ["emb"]
    assert report["analysed_from"] == {"tensors": ["emb"], "kind": "embedding outputs"}
    # Before: with no float input the check ran on nothing and said "all supported".
    assert all(missing == ["Mystery"] for missing in report["unsupported"].values())
    ok = inspect_json(token_model(False), tmp_path)
    assert all(missing == [] for missing in ok["unsupported"].values())


def test_inspect_without_embedding_starts_at_the_first_float_tensor(tmp_path):
    m = token_model(True, table_2d=False)
    report = inspect_json(m, tmp_path)
    assert report["analysed_from"] == {"tensors": ["emb"], "kind": "first float tensor computed from the inputs"}
    assert report["unsupported"]["gradient"] == ["Mystery"]


def test_inspect_says_when_no_float_tensor_exists(tmp_path):
    g = helper.make_graph([helper.make_node("Add", ["a", "a"], ["b"])], "ints",
                          [helper.make_tensor_value_info("a", TensorProto.INT64, ["N", 2])],
                          [helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "ints.onnx"
    onnx.save(m, path)
    result = CliRunner().invoke(cli.main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "white-box methods do not apply" in result.stdout
    assert "all supported" not in result.stdout
