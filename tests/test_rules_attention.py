"""Attention: gradients through fully masked rows are the forward's limit (0, never NaN),
and the fused Attention operator's gradient equals finite differences."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import backend_corpus as bc
from gradcheck import check_gradient

from onnxplain import Explainer


def _masked_rows_model(op: str):
    """y = Where(row_masked, 0, op(x + bias)) where bias is -inf on the whole of row 1 (and on
    part of row 2 for Softmax, whose outputs stay finite there): op's row 1 is NaN (all -inf)
    and replaced by 0, as attention functions do."""
    bias = np.zeros((4, 5), np.float32)
    bias[1] = -np.inf
    if op == "Softmax":
        bias[2, :3] = -np.inf
    masked = np.zeros((4, 1), bool)
    masked[1] = True
    nodes = [helper.make_node("Add", ["x", "bias"], ["s"]),
             helper.make_node(op, ["s"], ["p"], axis=-1),
             helper.make_node("Where", ["masked", "zero", "p"], ["y"])]
    inits = [numpy_helper.from_array(bias, "bias"), numpy_helper.from_array(masked, "masked"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_fully_masked_row_has_a_zero_gradient_not_nan(op):
    x = np.random.default_rng(0).normal(size=(2, 4, 5)).astype(np.float32)
    m = _masked_rows_model(op)
    seed = np.random.default_rng(1).normal(size=(2, 4, 5)).astype(np.float32)
    got = Explainer(m, canonize=False).attribute(x, method="gradient", target=seed, probability=True)
    assert np.isfinite(got).all()
    assert not got[:, 1].any()
    if op == "Softmax":  # exp(-inf) = 0: the masked entries of a partly masked row have no gradient
        assert not got[:, 2, :3].any()
    check_gradient(m, {"x": x})


# --- the fused Attention operator (opset 23), by its function body ---------------------------
def _attention(**attrs):
    """Inputs of a 4-D Attention (batch 2, 3 query heads / kv heads as given, 4 queries,
    5 keys, head size 6 / value head size 7)."""
    rng = np.random.default_rng(0)
    kv = attrs.pop("kv_heads", 3)
    return {"Q": rng.normal(size=(2, 3, 4, 6)), "K": rng.normal(size=(2, kv, 5, 6)),
            "V": rng.normal(size=(2, kv, 5, 7))}, attrs


def _passes(result):
    assert result.status == "passed", (result.status, result.detail)


ATTENTION_4D_CASES = {
    "plain": {},
    "scale": {"scale": 0.7},
    "causal": {"is_causal": 1},
    "softcap": {"softcap": 2.5},
    "gqa": {"kv_heads": 1},
    "causal_softcap_gqa": {"kv_heads": 1, "is_causal": 1, "softcap": 3.0},
}


@pytest.mark.parametrize("name", list(ATTENTION_4D_CASES))
def test_fused_attention_gradient_equals_finite_differences(name):
    ins, attrs = _attention(**ATTENTION_4D_CASES[name])
    _passes(bc.check_node("Attention", {k: v.astype(np.float32) for k, v in ins.items()}, attrs, opset=23))


def test_fused_attention_float_mask_is_differentiated_too():
    ins, _ = _attention()
    ins["attn_mask"] = np.random.default_rng(1).normal(size=(4, 5))
    _passes(bc.check_node("Attention", {k: v.astype(np.float32) for k, v in ins.items()}, {}, opset=23))


def test_fused_attention_bool_mask_gradient():
    # (A fully masked row is NaN in onnxruntime's fused kernel, so only the _expanded form can
    # be checked there: test_fully_masked_row_has_a_zero_gradient_not_nan.)
    ins, _ = _attention()
    mask = np.ones((4, 5), bool)
    mask[0, :2] = False
    mask[3, 1:] = False
    _passes(bc.check_node("Attention", {k: v.astype(np.float32) for k, v in ins.items()}, {},
                          consts={"attn_mask": mask}, opset=23))


def test_fused_attention_with_past_key_value_differentiates_every_output():
    # Y, present_key and present_value all seeded: the past tensors' gradients pass the
    # concatenation and the attention.
    ins, _ = _attention()
    rng = np.random.default_rng(2)
    ins.update(attn_mask=rng.normal(size=(4, 8)), past_key=rng.normal(size=(2, 3, 3, 6)),
               past_value=rng.normal(size=(2, 3, 3, 7)))
    _passes(bc.check_node("Attention", {k: v.astype(np.float32) for k, v in ins.items()}, {}, opset=23,
                          n_outputs=3))


def test_fused_attention_3d_inputs_with_grouped_heads():
    rng = np.random.default_rng(3)
    ins = {"Q": rng.normal(size=(2, 4, 3 * 6)), "K": rng.normal(size=(2, 5, 1 * 6)),
           "V": rng.normal(size=(2, 5, 1 * 7))}
    _passes(bc.check_node("Attention", {k: v.astype(np.float32) for k, v in ins.items()},
                          {"q_num_heads": 3, "kv_num_heads": 1, "is_causal": 1}, opset=23))


def test_self_attention_reading_one_tensor_three_times_counts_each_use_once():
    x = np.random.default_rng(4).normal(size=(2, 3, 4, 6)).astype(np.float32)
    node = helper.make_node("Attention", ["x", "x", "x"], ["y"])
    g = helper.make_graph([node], "self_attention",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 10
    _passes(bc.check_model(m, {"x": x}))


def test_float64_attention_with_nonpad_kv_seqlen_is_refused_with_a_typed_error():
    ins, _ = _attention()
    r = bc.check_node("Attention", ins, {"is_causal": 1, "_order": ["Q", "K", "V", "", "", "", "n"]},
                      consts={"n": np.array([3, 5], np.int64)}, opset=24)
    assert r.status == "refused" and "nonpad_kv_seqlen" in r.detail, (r.status, r.detail)


@pytest.mark.parametrize("attrs,shape", [
    ({}, (2, 3, 5, 8)),
    ({"interleaved": 1, "rotary_embedding_dim": 4}, (2, 3, 5, 8)),
    ({"num_heads": 3}, (2, 5, 3 * 8)),
], ids=["4d", "interleaved_partial", "3d_heads"])
def test_rotary_embedding_gradient_equals_finite_differences(attrs, shape):
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape)
    half = (attrs.get("rotary_embedding_dim") or 8) // 2
    angles = rng.uniform(0, 3, size=(7, half))
    consts = {"cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
              "pos": rng.integers(0, 7, size=(2, 5))}
    _passes(bc.check_node("RotaryEmbedding", {"x": x.astype(np.float32)}, dict(attrs, _order=["x", "cos", "sin", "pos"]),
                          consts=consts, opset=23))


def test_attention_under_lrp_and_deeplift_is_refused_with_typed_errors():
    # LRP rules inside the body meet Q.K^T, a product of two computed tensors; DeepLIFT
    # cannot see the body's activations on the baseline.
    from onnxplain.errors import ModelError, UnsupportedOperatorError

    x = np.random.default_rng(6).normal(size=(2, 3, 4, 6)).astype(np.float32)
    node = helper.make_node("Attention", ["x", "x", "x"], ["y"])
    g = helper.make_graph([node], "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 10
    e = Explainer(m, canonize=False)
    seed = np.ones(x.shape, np.float32)
    with pytest.raises(ModelError, match="MatMul"):
        e.attribute(x, method="lrp_epsilon", target=seed, probability=True)
    with pytest.raises(UnsupportedOperatorError, match="Attention"):
        e.attribute(x, method="deeplift", target=seed, probability=True)


def test_attention_through_the_explainer_with_a_symbolic_batch():
    # The user's path: a model whose batch is symbolic, explained through Explainer.
    from gradcheck import node_model

    rng = np.random.default_rng(8)
    feeds = {"Q": rng.normal(size=(3, 2, 4, 6)), "K": rng.normal(size=(3, 2, 5, 6)),
             "V": rng.normal(size=(3, 2, 5, 7))}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    m = node_model("Attention", feeds, {"is_causal": 1, "softcap": 4.0}, opset=23)
    for wrt in feeds:
        check_gradient(m, feeds, wrt=wrt)
