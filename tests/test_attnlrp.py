"""AttnLRP and CP-LRP on small transformers exported by both torch.onnx paths (eager and
SDPA attention, LayerNorm standard and decomposed), against the published rules written
as torch autograd (tests/transformer_zoo.py), and their conservation."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import transformer_zoo as tz
from onnxplain import Explainer
from onnxplain.graph import find_embeddings

# (exporter, sdpa attention, opset, gated): opset 14 TorchScript decomposes LayerNorm,
# TorchScript decomposes GELU (Div/Erf/Add/Mul), dynamo emits Gelu and LayerNormalization;
# gated: LLaMA's blocks, RMSNorm (decomposed) and a SiLU-gated MLP (a product of two
# computed tensors); dynamo at opset 23: SDPA as the `Attention` operator, whose function
# body the rules propagate through.
EXPORTS = [("torchscript", False, 17, False), ("torchscript", True, 17, False), ("torchscript", False, 14, False),
           ("dynamo", False, 17, False), ("dynamo", True, 17, False), ("torchscript", False, 17, True),
           ("dynamo", True, 17, True), ("dynamo", True, 23, False)]
TARGET = 1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformers")
    cache = {}

    def get(exporter, sdpa, opset, gated=False, zero_biases=False):
        key = (exporter, sdpa, opset, gated, zero_biases)
        if key not in cache:
            torch.manual_seed(0)
            model = tz.TinyEncoder(sdpa=sdpa, gated=gated).eval()
            if zero_biases:
                model.zero_biases()
            ids = model.example()
            path = folder / f"enc_{exporter}_{sdpa}_{opset}_{gated}_{zero_biases}.onnx"
            tz.export(model, path, exporter, ids, opset)
            cache[key] = (model, ids, Explainer(str(path)))
        return cache[key]

    return get


def _close(ours, ref, atol=2e-4):
    # Epsilon rules divide by sums that float32 rounds (most where a sum is near zero):
    # compare on the scale of the map.
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=atol * np.abs(ref).max())


@pytest.mark.parametrize("exporter,sdpa,opset,gated", EXPORTS)
def test_attnlrp_equals_torch_reference_of_the_published_rules(exported, exporter, sdpa, opset, gated):
    model, ids, ex = exported(exporter, sdpa, opset, gated)
    assert (opset == 23) == any(n.op_type == "Attention" for n in ex.graph.nodes)
    ours = ex.attribute(ids.numpy(), method="lrp.attnlrp", target=TARGET)
    assert ours.shape == (2, tz.TinyEncoder.tokens, tz.TinyEncoder.d)  # at the embedding output
    _close(ours, tz.relevance(model, ids, TARGET, tz.ATTNLRP).numpy())


@pytest.mark.parametrize("exporter,sdpa,opset,gated", [EXPORTS[0], EXPORTS[2], EXPORTS[4], EXPORTS[6]])
def test_attnlrp_equals_lxt_explicit_rules_on_the_same_model(exported, exporter, sdpa, opset, gated):
    """lxt's own explicit AttnLRP functions (linear_epsilon, softmax, matmul, layer_norm,
    rms_norm_identity, add2, mul2, mean) on the same weights; GELU/SiLU by the identity."""
    pytest.importorskip("lxt.explicit.functional")
    model, ids, ex = exported(exporter, sdpa, opset, gated)
    ours = ex.attribute(ids.numpy(), method="lrp.attnlrp", target=TARGET)
    _close(ours, tz.relevance(model, ids, TARGET, tz.LXT).numpy())


@pytest.mark.parametrize("exporter,sdpa,opset,gated", EXPORTS)
def test_cp_lrp_equals_torch_with_attention_and_layernorm_scale_detached(exported, exporter, sdpa, opset, gated):
    model, ids, ex = exported(exporter, sdpa, opset, gated)
    ours = ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET)
    _close(ours, tz.relevance(model, ids, TARGET, tz.CPLRP).numpy())


@pytest.mark.parametrize("exporter,sdpa,opset,gated", [EXPORTS[0], EXPORTS[2], EXPORTS[3], EXPORTS[5]])
def test_cp_lrp_with_gradient_activations_is_gradient_times_input_of_the_detached_model(exported, exporter, sdpa,
                                                                                           opset, gated):
    model, ids, ex = exported(exporter, sdpa, opset, gated)
    ours = ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET, activation="gradient")
    _close(ours, tz.relevance(model, ids, TARGET, tz.CPLRP_GRADIENT).numpy())


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_attention_as_einsum_takes_the_same_rules(tmp_path, exporter):
    torch.manual_seed(0)
    model = tz.TinyEncoder().eval()
    for blk in model.blocks:
        blk.einsum = True
    ids = model.example()
    ex = Explainer(str(tz.export(model, tmp_path / "einsum.onnx", exporter, ids)))
    assert sum(n.op_type == "Einsum" for n in ex.graph.nodes) == 4
    for method, mode in (("lrp.attnlrp", tz.ATTNLRP), ("lrp.cp_lrp", tz.CPLRP)):
        _close(ex.attribute(ids.numpy(), method=method, target=TARGET), tz.relevance(model, ids, TARGET, mode).numpy())


def _logit(model, ids):
    with torch.no_grad():
        return model(ids)[:, TARGET].numpy()


@pytest.mark.parametrize("opset,gated", [(17, False), (14, False), (17, True)])
def test_cp_lrp_without_biases_conserves_the_logit(exported, opset, gated):
    model, ids, ex = exported("torchscript", False, opset, gated, zero_biases=True)
    for options in ({}, {"gamma": 0.25}):
        total = ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET, **options).sum(axis=(1, 2))
        np.testing.assert_allclose(total, _logit(model, ids), rtol=1e-4)


def test_attnlrp_without_biases_conserves_the_logit_but_for_the_softmax_taylor_residuals(exported):
    """Every AttnLRP rule conserves relevance without biases except the softmax's Taylor
    decomposition at its input, whose residual (the relevance its output holds less what its
    input gets) is the published rule's: the embedding's total is the logit less those."""
    model, ids, ex = exported("torchscript", False, 17, zero_biases=True)
    total = ex.attribute(ids.numpy(), method="lrp.attnlrp", target=TARGET).sum(axis=(1, 2))
    softmaxes = [n for n in ex.graph.nodes if n.op_type == "Softmax"]
    assert len(softmaxes) == 2
    residual = 0.0
    for node in softmaxes:
        at = {t: ex.attribute(ids.numpy(), method="lrp.attnlrp", target=TARGET, layer=t)
              for t in (node.input[0], node.output[0])}
        residual = residual + at[node.output[0]].sum(axis=(1, 2, 3)) - at[node.input[0]].sum(axis=(1, 2, 3))
    np.testing.assert_allclose(total, _logit(model, ids) - residual, rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(residual) > 1e-3)  # the check is not vacuous


def test_relevance_with_biases_stays_on_the_scale_of_the_logit(exported):
    """The explosion of per-node LRP on transformers (totals of 1e2-1e10 for logits below 1)
    is gone: the totals are those of the reference, on the logit's scale."""
    model, ids, ex = exported("torchscript", False, 17)
    logit = _logit(model, ids)
    for method in ("lrp.attnlrp", "lrp.cp_lrp"):
        total = ex.attribute(ids.numpy(), method=method, target=TARGET).sum(axis=(1, 2))
        assert np.all(np.abs(total) < 2 * np.abs(logit) + 0.5), (method, total, logit)


def test_attnlrp_explainer_exports_and_runs_alone(exported, tmp_path):
    model, ids, ex = exported("dynamo", True, 17)
    emb = find_embeddings(ex.graph)[0]
    path = tmp_path / "attnlrp.onnx"
    spec = ex.export(path, method="lrp.attnlrp", layer=emb)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seed = np.zeros((2, tz.TinyEncoder.classes), np.float32)
    seed[:, TARGET] = 1
    out = sess.run([spec.attributions[emb]], {"input_ids": ids.numpy(), spec.seed: seed})[0]
    _close(out, ex.attribute(ids.numpy(), method="lrp.attnlrp", target=TARGET))


@pytest.mark.parametrize("exporter,sdpa", [("torchscript", False), ("dynamo", True)])
def test_vit_relevance_at_the_pixels_equals_torch_reference(tmp_path, exporter, sdpa):
    """A ViT: Conv patches, a CLS token concatenated, a position table added, the CLS row
    read out; the relevance goes down to the pixels through the patch Conv's epsilon rule."""
    model = tz.TinyViT(sdpa=sdpa).eval()
    x = model.example()
    ex = Explainer(str(tz.export(model, tmp_path / "vit.onnx", exporter, x)))
    for method, mode in (("lrp.attnlrp", tz.ATTNLRP), ("lrp.cp_lrp", tz.CPLRP)):
        ours = ex.attribute(x.numpy(), method=method, target=0)
        assert ours.shape == x.shape
        # 48 patch sums per pixel channel, some near zero: one pixel in 1536 was 3e-4 off.
        _close(ours, tz.input_relevance(model, x, 0, mode).numpy(), atol=1e-3)


def test_the_predicted_class_is_explained_in_one_pass_from_its_logit(exported):
    model, ids, ex = exported("torchscript", False, 17)
    with torch.no_grad():
        predicted = model(ids).numpy().argmax(1)
    ours = ex.attribute(ids.numpy(), method="lrp.attnlrp")
    ref = np.stack([tz.relevance(model, ids[i:i + 1], int(c), tz.ATTNLRP).numpy()[0] for i, c in enumerate(predicted)])
    _close(ours, ref)


# ----------------------------------------------------------------------------- transformers' BERT and GPT-2
def _hf(kind, tmp_path, attn):
    pytest.importorskip("transformers")
    return tz.hf_model(kind, tmp_path / f"{kind}_{attn}.onnx", attn, TARGET)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_transformers_models_cp_lrp_conserves_the_logit_at_the_embedding_sum(tmp_path, kind):
    """Random-initialised BERT and GPT-2 (zero biases, as transformers initialises them):
    CP-LRP's relevance at the sum of word, position (and type) embeddings is the logit;
    the word embeddings hold their share of it. AttnLRP agrees between eager and SDPA
    exports of the same weights (different graphs: masking by Add or Where, NaN rows)."""
    results = {}
    for attn in ("eager", "sdpa"):
        ex, feeds, seed, logit = _hf(kind, tmp_path, attn)
        embedding_sum = [n for n in ex.graph.nodes if n.op_type == "LayerNormalization"][0].input[0]
        cp = ex.attribute(feeds, method="lrp.cp_lrp", target=seed, layer=embedding_sum)
        np.testing.assert_allclose(cp.sum(axis=(1, 2)), logit, rtol=2e-3, atol=1e-6)
        words = ex.attribute(feeds, method="lrp.attnlrp", target=seed)
        assert words.shape == (2, 8, 32) and np.all(np.isfinite(words))
        results[attn] = words
    _close(results["sdpa"], results["eager"])


# ----------------------------------------------------------------------------- single operators vs numpy
def _one_node(tmp_path, op, inputs, attrs=None, inits=(), opset=23, out_shape=None):
    """A model of one node; the seed R0 is given so that the relevance entering the node is
    R0 * y (the relevance starts at the explained value times the seed)."""
    from onnx import TensorProto, helper, numpy_helper

    names = [f"x{k}" for k in range(len(inputs))]
    node = helper.make_node(op, names + [n for n, _ in inits], ["y"], **(attrs or {}))
    g = helper.make_graph([node], "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape)
                                        for n, a in zip(names, inputs)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          initializer=[numpy_helper.from_array(v, n) for n, v in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return Explainer(m), dict(zip(names, inputs))


def test_softmax_rule_is_the_taylor_decomposition_at_the_input_and_masked_scores_hold_none(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    mask = np.zeros((1, 3, 5), np.float32)
    mask[0, 1, 2] = -np.inf  # an additive attention mask
    # A scaling after the softmax, so that it is no terminal softmax (which is looked through).
    nodes = [helper.make_node("Add", ["x", "mask"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=-1),
             helper.make_node("Mul", ["p", "c"], ["y"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
                          initializer=[numpy_helper.from_array(mask, "mask"),
                                       numpy_helper.from_array(np.array(1.5, np.float32), "c")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    seed = rng.normal(size=x.shape).astype(np.float32)
    z = x + mask
    s = np.exp(z - z.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    r = seed * 1.5 * s  # the relevance of p: the scaling passes it
    ref = np.where(np.isinf(z), 0.0, z) * (r - s * r.sum(-1, keepdims=True))  # at z; x holds it (mask 0 or -inf)
    ours = Explainer(m).attribute(x, method="lrp.attnlrp", target=seed)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert ours[0, 1, 2] == 0.0


def test_layernorm_rule_is_the_epsilon_rule_of_the_map_with_the_variance_held_constant(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    scale = rng.normal(size=(3, 4)).astype(np.float32)
    bias = rng.normal(size=(3, 4)).astype(np.float32)
    ex, feeds = _one_node(tmp_path, "LayerNormalization", [x], {"axis": -2, "epsilon": 1e-5},
                          inits=[("scale", scale), ("bias", bias)], out_shape=[2, 3, 4])
    seed = rng.normal(size=x.shape).astype(np.float32)
    mean = x.mean((1, 2), keepdims=True)
    sigma = np.sqrt(((x - mean) ** 2).mean((1, 2), keepdims=True) + 1e-5)
    y = scale * (x - mean) / sigma + bias
    s = seed * y / y  # R / y
    # x * A^T s with A = diag(scale / sigma) (I - 11^T / N): the epsilon rule of that linear map
    c = scale * s / sigma
    ref = x * (c - c.mean((1, 2), keepdims=True))
    np.testing.assert_allclose(ex.attribute(feeds, method="lrp.attnlrp", target=seed), ref, rtol=1e-4, atol=1e-5)


def test_rmsnorm_operator_passes_relevance(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    scale = rng.normal(size=(4,)).astype(np.float32)
    ex, feeds = _one_node(tmp_path, "RMSNormalization", [x], {"axis": -1}, inits=[("scale", scale)],
                          out_shape=[2, 3, 4])
    seed = rng.normal(size=x.shape).astype(np.float32)
    y = ex.predict(feeds)
    np.testing.assert_allclose(ex.attribute(feeds, method="lrp.attnlrp", target=seed), seed * y, rtol=1e-5, atol=1e-6)


def test_product_of_two_computed_tensors_gives_each_operand_half_by_the_epsilon_rule(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2, 3, 4)).astype(np.float32)
    b = rng.normal(size=(2, 4, 5)).astype(np.float32)
    ex, feeds = _one_node(tmp_path, "MatMul", [a, b], out_shape=[2, 3, 5])
    seed = rng.normal(size=(2, 3, 5)).astype(np.float32)
    y = a @ b
    s = seed * y / y / 2
    ours = ex.attribute(feeds, method="lrp.attnlrp", target=seed)
    np.testing.assert_allclose(ours["x0"], a * (s @ b.transpose(0, 2, 1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["x1"], b * (a.transpose(0, 2, 1) @ s), rtol=1e-4, atol=1e-5)
    total = ours["x0"].sum((1, 2)) + ours["x1"].sum((1, 2))
    np.testing.assert_allclose(total, (seed * y).sum((1, 2)), rtol=1e-4)


# ----------------------------------------------------------------------------- CP-LRP's gamma per layer
def _gamma_forward(layer, gamma):
    """The forward of nn.Linear `layer` under the gamma rule for gradient x input (Zennit's
    generalised Gamma, as lrp.gamma_rule states it): where the output is positive, z+ =
    x+ (W + gamma W+) + x- (W + gamma W-), where negative z- with the two swapped; the output
    keeps its value as z * (y / stabilise(z)).detach(), so the chain rule gives
    x * W_gamma^T (R / z). An output that is exactly 0 passes nothing. A 2-D input is one
    Gemm whose bias is in the rule (b + gamma b+ / b + gamma b-); a 3-D input is exported
    as a MatMul and a bias Add after it, which splits its relevance in proportion."""
    from torch.nn import functional as F

    w, bias = layer.weight, layer.bias

    def stab(z):
        return z + torch.where(z < 0, -1e-6, 1e-6)

    def forward(x):
        in_rule = x.dim() == 2
        up, down = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
        xp = x.clamp(min=0)
        xn = x - xp
        y = F.linear(x, w, bias if in_rule else None)
        z_pos, z_neg = F.linear(xp, up) + F.linear(xn, down), F.linear(xp, down) + F.linear(xn, up)
        if in_rule:
            z_pos = z_pos + bias + gamma * bias.clamp(min=0)
            z_neg = z_neg + bias + gamma * bias.clamp(max=0)
        out = torch.where(y > 0, z_pos * (y / stab(z_pos)).detach(),
                          torch.where(y < 0, z_neg * (y / stab(z_neg)).detach(), torch.zeros_like(y)))
        return out if in_rule else out + bias

    return forward


def _cp_lrp_with_gammas(model, x, gammas: dict):
    """The CP-LRP reference with the gamma rule on the nn.Linear layers named in `gammas`
    ({module path: gamma}); the others keep the epsilon rule."""
    modules = dict(model.named_modules())
    try:
        for name, g in gammas.items():
            modules[name].forward = _gamma_forward(modules[name], g)
        if x.dtype == torch.int64:
            return tz.relevance(model, x, TARGET, tz.CPLRP).numpy()
        return tz.input_relevance(model, x, TARGET, tz.CPLRP).numpy()
    finally:
        for name in gammas:
            del modules[name].forward  # the class's forward again


BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_cp_lrp_gamma_list_gives_each_block_its_gamma_and_the_head_the_epsilon_rule(exported, exporter):
    """gamma=[g0, g1]: every linear layer of block k takes gamma g_k (the blocks read off the
    exported module names: TorchScript node names, dynamo's name scopes); the head outside
    the blocks keeps the epsilon rule."""
    model, ids, ex = exported(exporter, False, 17)
    ours = ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET, gamma=[0.5, 0.1])
    ref = _cp_lrp_with_gammas(model, ids, {f"blocks.{k}.{n}": g for k, g in enumerate((0.5, 0.1))
                                           for n in BLOCK_LINEARS})
    _close(ours, ref)
    # the gammas matter: the epsilon rule (and one gamma for both blocks) give other maps
    for other in (0.0, 0.5):
        assert np.abs(ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET, gamma=other) - ours).max() \
            > 1e-2 * np.abs(ours).max()


def test_cp_lrp_gamma_dict_names_layers_the_longest_name_winning_on_a_vit(tmp_path):
    """gamma={module: value}: a module and the modules under it ('blocks.0'), a more
    specific name overriding it ('blocks.0.fc2'), the Gemm head with its bias in the rule;
    down to the pixels through the patch Conv's epsilon rule."""
    model = tz.TinyViT().eval()
    x = model.example()
    ex = Explainer(str(tz.export(model, tmp_path / "vit.onnx", "torchscript", x)))
    gamma = {"blocks.0": 0.25, "blocks.0.fc2": 1.0, "blocks.1.qkv": 0.5, "head": 0.1}
    ours = ex.attribute(x.numpy(), method="lrp.cp_lrp", target=TARGET, gamma=gamma)
    layers = {f"blocks.0.{n}": 0.25 for n in BLOCK_LINEARS} | {"blocks.0.fc2": 1.0, "blocks.1.qkv": 0.5, "head": 0.1}
    ref = _cp_lrp_with_gammas(model, x, layers)
    _close(ours, ref, atol=1e-3)
    epsilon = tz.input_relevance(model, x, TARGET, tz.CPLRP).numpy()
    assert np.abs(ref - epsilon).max() > 1e-2 * np.abs(ref).max()  # the reference applies the gammas


def test_cp_lrp_gamma_number_is_every_linear_layer(exported):
    model, ids, ex = exported("torchscript", False, 17)
    ours = ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET, gamma=0.25)
    _close(ours, ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET, gamma={"blocks": 0.25, "head": 0.25}))
    _close(ours, _cp_lrp_with_gammas(model, ids, {f"blocks.{k}.{n}": 0.25 for k in (0, 1) for n in BLOCK_LINEARS}
                                     | {"head": 0.25}))


def test_cp_lrp_gamma_that_cannot_apply_is_an_error_not_the_epsilon_rule(exported):
    from onnxplain.errors import OptionError

    model, ids, ex = exported("torchscript", False, 17)
    with pytest.raises(OptionError, match="2 blocks under 'blocks'"):
        ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET, gamma=[0.25, 0.25, 0.25])
    with pytest.raises(OptionError, match="blocks.7.*select no linear layer"):
        ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET, gamma={"blocks.7": 0.25})
    with pytest.raises(OptionError, match=">= 0"):
        ex.attribute(ids.numpy(), method="lrp.cp_lrp", target=TARGET, gamma=[0.25, -1])


def test_cp_lrp_gamma_from_the_command_line_is_a_number_a_comma_list_or_json():
    from onnxplain.rules.attnlrp import parse_gamma

    assert parse_gamma("0.25") == 0.25
    assert parse_gamma("0.5,0.25") == (0.5, 0.25)
    assert parse_gamma("[1, 0]") == (1.0, 0.0)
    assert parse_gamma('{"blocks.0": 0.5}') == {"blocks.0": 0.5}
