"""Semantics-preserving rewrites that make rules apply cleanly.

Each rewrite takes and returns an onnx.ModelProto and must leave the model's outputs
unchanged (tests/test_canonize.py checks every one on exported models). Rewrites keep the
names of graph inputs and outputs; a folded node's output takes the name of the tensor it
replaces, so every tensor downstream keeps its name.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import infer_types, node_inputs

PASSTHROUGH = ("Identity", "Dropout")
# Folding these would freeze one random draw into the model.
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                    "Multinomial", "Bernoulli", "Dropout"}
MAX_FOLD_BYTES = 64 * 1024**2
# Foldable from inferred types alone: the data of their (second) input is never read.
TYPE_FOLDABLE = ("Shape", "Size", "CastLike")


# --- helpers shared by the rewrites ------------------------------------------------------
def _is_onnx(node) -> bool:
    return node.domain in ("", "ai.onnx")


def _has_subgraph(node) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _subgraph_inputs(graph) -> set[str]:
    """Names that nodes inside subgraphs (If/Loop/Scan bodies) read, outer scope included."""
    names = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names.update(i for n in sub.node for i in n.input)
                names.update(o.name for o in sub.output)
                names |= _subgraph_inputs(sub)
    return names


def _consumers(graph) -> dict[str, list]:
    users = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _auto_pad_free(node) -> bool:
    """True when a Conv's padding is given by its `pads` (auto_pad NOTSET) or is none (VALID)."""
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    return (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) in ("NOTSET", "VALID")


def _set_attr(node, name, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _constant_node_value(node) -> np.ndarray | None:
    a = node.attribute[0] if len(node.attribute) == 1 else None
    if a is None:
        return None
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name in ("value_float", "value_int", "value_string"):
        v = helper.get_attribute_value(a)
        return np.array(v, dtype={"value_float": np.float32, "value_int": np.int64}.get(a.name, object))
    if a.name in ("value_floats", "value_ints", "value_strings"):
        v = list(helper.get_attribute_value(a))
        return np.array(v, dtype={"value_floats": np.float32, "value_ints": np.int64}.get(a.name, object))
    return None  # sparse_value: left as a node


def _constants(graph) -> dict[str, np.ndarray]:
    """Every tensor fixed at load time: initializers and Constant node outputs.

    As in graph.Graph, an initializer also listed as a graph input counts as a constant.
    """
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and _is_onnx(node):
            v = _constant_node_value(node)
            if v is not None:
                values[node.output[0]] = v
    return values


def _add_initializer(graph, name: str, value: np.ndarray) -> None:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def _fresh_name(graph, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {vi.name for vi in graph.input}
    taken |= {o for n in graph.node for o in n.output}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def remove_dead_code(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers that no graph output depends on; graph outputs stay.

    Every rewrite that changes the graph ends here, so this also tidies: value_info of
    tensors that are gone is dropped, and new initializers are declared where IR 3 wants it.
    """
    g = model.graph
    live = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in live for o in node.output if o):
            keep.append(node)
            live.update(node_inputs(node))  # what its subgraphs read stays too
    keep.reverse()
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    dead = {t.name for t in g.initializer if t.name not in live}
    if dead:
        kept = [t for t in g.initializer if t.name not in dead]
        del g.initializer[:]
        g.initializer.extend(kept)
        # An unused parameter that was also listed as a graph input goes with it.
        inputs = [vi for vi in g.input if vi.name not in dead]
        del g.input[:]
        g.input.extend(inputs)
    produced = {o for n in g.node for o in n.output} | {vi.name for vi in g.input}
    produced |= {t.name for t in g.initializer}
    infos = [vi for vi in g.value_info if vi.name in produced]
    del g.value_info[:]
    g.value_info.extend(infos)
    if model.ir_version < 4:  # IR 3 requires every initializer, new ones too, to be an input
        declared = {vi.name for vi in g.input}
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                       for t in g.initializer if t.name not in declared)
    return model


def _without_nodes(model: onnx.ModelProto, removed: set[int]) -> onnx.ModelProto:
    """The model without the nodes whose id() is in removed, dead code dropped."""
    if not removed:
        return model
    kept = [n for n in model.graph.node if id(n) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return remove_dead_code(model)


def _rename_inputs(graph, rename: dict[str, str]) -> None:
    """Make every reader of a renamed tensor read its new name, inside subgraphs too."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename_inputs(sub, rename)
                for out in sub.output:
                    if out.name in rename:
                        out.name = rename[out.name]


# --- constant folding ----------------------------------------------------------------------
def _inferred_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    """Inferred (elem_type, shape) per tensor, shape with an int per static axis and None
    elsewhere, every input's first axis free.

    The Explainer runs any model with a free batch axis (graph.Graph.specialize), so a shape
    that depends on the batch must never be frozen, even if the file declares batch 1.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consts = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in consts and len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_param = "__batch__"
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    try:
        m = infer_types(m, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    types = {}
    for vi in list(m.graph.value_info) + list(m.graph.input):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim) \
                if t.HasField("shape") else None
            types[vi.name] = (t.elem_type, shape)
    return types


def _fold_from_types(node, values, types) -> np.ndarray | None:
    """Shape/Size with every requested axis static, CastLike of a constant to a known type."""
    if node.op_type == "CastLike":
        elem_type = types.get(node.input[1], (0, None))[0]
        if node.input[0] not in values or not elem_type:
            return None
        return values[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(elem_type))
    shape = types.get(node.input[0], (0, None))[1]
    if shape is None:
        return None
    if node.op_type == "Shape":
        shape = shape[_attr(node, "start", 0):_attr(node, "end", None)]
    if any(d is None for d in shape):
        return None
    if node.op_type == "Size":
        return np.array(int(np.prod(shape)), dtype=np.int64)
    return np.array(shape, dtype=np.int64)


def _predicted_bytes(node, values) -> int:
    """An upper bound on the output size for ops whose size depends on input values."""
    if node.op_type in ("ConstantOfShape", "Expand", "Tile", "Range"):
        try:
            if node.op_type == "ConstantOfShape":
                n = np.prod(values[0], dtype=np.float64)
            elif node.op_type == "Expand":
                n = np.prod(np.broadcast_shapes(values[0].shape, tuple(int(d) for d in values[1])), dtype=np.float64)
            elif node.op_type == "Tile":
                n = values[0].size * np.prod(values[1], dtype=np.float64)
            else:
                n = abs((float(values[1]) - float(values[0])) / float(values[2]))
        except Exception:
            return MAX_FOLD_BYTES + 1
        return int(min(n * 8, 2**62))
    return 0


_REFERENCE_FROM = {"DequantizeLinear": 19, "QuantizeLinear": 19}


def _evaluate(node, values: list, opset_import) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if name else "" for i, name in enumerate(node.input)]
    one = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))], domain=node.domain)
    one.attribute.extend(node.attribute)
    try:
        inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                  for n, v in zip(names, values) if n]
        graph = helper.make_graph([one], "fold", inputs, [helper.make_empty_tensor_value_info(o) for o in one.output])
        opsets = list(opset_import)
        if node.op_type in _REFERENCE_FROM and node.domain in ("", "ai.onnx"):
            # The reference runtime implements (De)QuantizeLinear from opset 19 only, whose
            # versions 13..19 agree on integer types: a weight's DequantizeLinear of a constant
            # folds to the dequantized weight in any opset, as relevance rules need it.
            opsets = [helper.make_opsetid("", max(o.version, _REFERENCE_FROM[node.op_type]))
                      if o.domain in ("", "ai.onnx") else o for o in opsets]
        model = helper.make_model(graph, opset_imports=opsets)
        results = ReferenceEvaluator(model).run(None, {n: v for n, v in zip(names, values) if n})
    except Exception:  # an op the reference runtime lacks, or inputs it rejects: keep the node
        return None
    if not all(isinstance(r, (np.ndarray, np.generic)) for r in results):
        return None  # sequences and optionals stay as nodes
    return [np.asarray(r) for r in results]


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constants and keep its result as an initializer.

    Constant nodes become initializers; Shape/Size of a tensor whose shape is static (never
    the batch axis) and CastLike to a known type become constants; nodes no output needs any
    more are removed.
    A node producing a graph output, a random node, a node with a subgraph or a custom domain,
    or a result over MAX_FOLD_BYTES stays.
    """
    g = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    outputs = {o.name for o in g.output}
    types = _inferred_types(model) if any(n.op_type in TYPE_FOLDABLE for n in g.node) else {}
    keep, folded = [], {}
    for node in g.node:
        result = None
        if not _is_onnx(node) or _has_subgraph(node) or node.op_type in NONDETERMINISTIC \
                or any(o in outputs for o in node.output):
            pass
        elif node.op_type == "Constant":
            v = _constant_node_value(node)
            result = None if v is None else [v]
        elif node.op_type in TYPE_FOLDABLE and not all(i in values for i in node.input):
            v = _fold_from_types(node, values, types)
            result = None if v is None else [v]
        elif all(i in values for i in node.input if i):
            ins = [values[i] if i else None for i in node.input]
            if _predicted_bytes(node, ins) <= MAX_FOLD_BYTES:
                result = _evaluate(node, ins, model.opset_import)
                if result is not None and sum(r.nbytes for r in result) > MAX_FOLD_BYTES:
                    result = None
        if result is None or len(result) != len(node.output):
            keep.append(node)
            continue
        for name, v in zip(node.output, result):
            if name:
                values[name] = folded[name] = v
    del g.node[:]
    g.node.extend(keep)
    for name, v in folded.items():
        _add_initializer(g, name, v)
    return remove_dead_code(model)


# --- BatchNormalization into the adjacent linear layer -----------------------------------
def _bn_affine(node, consts) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with BN(x) = x * s + t per channel, or None when the BN cannot be folded."""
    if not _is_onnx(node) or len(node.input) != 5 or _attr(node, "training_mode", 0):
        return None
    if any(o for o in node.output[1:]):
        return None  # training-mode outputs (running mean/var) are used
    params = [consts.get(i) for i in node.input[1:]]
    if any(p is None or p.ndim != 1 for p in params):
        return None
    scale, bias, mean, var = (p.astype(np.float64) for p in params)
    s = scale / np.sqrt(var + _attr(node, "epsilon", 1e-5))
    return s, bias - mean * s


def _linear_params(node, consts):
    """Weight and optional bias of a Conv or Gemm with constant parameters, else None."""
    if not _is_onnx(node) or node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
        return None
    w = consts.get(node.input[1])
    b = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if w is None or (len(node.input) > 2 and node.input[2] and b is None):
        return None
    if node.op_type == "Gemm" and (w.ndim != 2 or _attr(node, "transA", 0)):
        return None
    return w, b


def _replace_params(graph, consts, node, w: np.ndarray, b: np.ndarray, dtype) -> None:
    """Give the node new initializers: the old ones may be shared with other nodes."""
    wname = _fresh_name(graph, node.input[1] + "_folded")
    has_bias = len(node.input) > 2 and node.input[2]
    bname = _fresh_name(graph, (node.input[2] if has_bias else wname) + "_bias_folded")
    for name, value in ((wname, w), (bname, b)):
        consts[name] = value.astype(dtype)
        _add_initializer(graph, name, consts[name])
    node.input[1] = wname
    if len(node.input) > 2:
        node.input[2] = bname
    else:
        node.input.append(bname)


def _out_features(linear, w: np.ndarray) -> int:
    return w.shape[0 if linear.op_type == "Conv" or _attr(linear, "transB", 0) else 1]


def _fold_bn_after(linear, s, t, w, b, graph, consts) -> None:
    """linear(x) * s + t as one linear layer: scale each output channel."""
    if linear.op_type == "Conv":
        w2 = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        b2 = (0.0 if b is None else b) * s + t
    else:
        alpha, beta = _attr(linear, "alpha", 1.0), _attr(linear, "beta", 1.0)
        w2 = w * (s[:, None] if _attr(linear, "transB", 0) else s[None, :]) * alpha
        b2 = (0.0 if b is None else beta * b) * s + t
        _set_attr(linear, "alpha", 1.0)
        _set_attr(linear, "beta", 1.0)
    _replace_params(graph, consts, linear, w2, np.asarray(b2), w.dtype)


def _fold_bn_before(linear, s, t, w, b, graph, consts) -> bool:
    """linear(x * s + t) as one linear layer: scale each input channel, bias absorbs t.

    Exact only when no padding sees the BN's shift: Gemm always, Conv with zero pads.
    """
    if linear.op_type == "Conv":
        if any(_attr(linear, "pads", None) or [0]) or not _auto_pad_free(linear):
            return False
        group = _attr(linear, "group", 1)
        m, cg = w.shape[0], w.shape[1]
        if s.size != group * cg or m % group:
            return False
        rows = np.arange(m) // (m // group)  # the group of each output channel
        sw, tw = s.reshape(group, cg)[rows], t.reshape(group, cg)[rows]
        extra = (1,) * (w.ndim - 2)
        w2 = w * sw.reshape(sw.shape + extra)
        shift = (w * tw.reshape(tw.shape + extra)).reshape(m, -1).sum(axis=1)
        b2 = (0.0 if b is None else b) + shift
    else:
        alpha, beta = _attr(linear, "alpha", 1.0), _attr(linear, "beta", 1.0)
        trans_b = _attr(linear, "transB", 0)
        wk = w.T if trans_b else w  # (K, M)
        if s.size != wk.shape[0]:
            return False
        w2 = w * (s[None, :] if trans_b else s[:, None]) * alpha
        b2 = (0.0 if b is None else beta * b) + alpha * (t @ wk)
        _set_attr(linear, "alpha", 1.0)
        _set_attr(linear, "beta", 1.0)
    _replace_params(graph, consts, linear, w2, np.asarray(b2), w.dtype)
    return True


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold inference BatchNormalization into the Conv/Gemm right before or after it.

    After: the linear layer's output must feed only the BN. Before: the BN's output must
    feed only one linear layer whose padding cannot see the BN's shift. Any other BN stays
    (it has its own backward rule).
    """
    g = model.graph
    outputs = {o.name for o in g.output}
    hidden = _subgraph_inputs(g)
    removed = set()
    consts = _constants(g)
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        affine = _bn_affine(bn, consts)
        if affine is None:
            continue
        s, t = affine
        users = _consumers(g)
        x, y = bn.input[0], bn.output[0]
        producer = next((n for n in g.node if x in n.output and id(n) not in removed), None)
        params = _linear_params(producer, consts) if producer is not None else None
        if (params is not None and len(users[x]) == 1 and x not in outputs and x not in hidden
                and producer.output[0] == x and _out_features(producer, params[0]) == s.size):
            _fold_bn_after(producer, s, t, *params, g, consts)
            producer.output[0] = y
        else:
            if len(users[y]) != 1 or y in outputs or y in hidden:
                continue
            linear = users[y][0]
            params = _linear_params(linear, consts)
            if params is None or linear.input[0] != y or y in linear.input[1:]:
                continue
            if not _fold_bn_before(linear, s, t, *params, g, consts):
                continue
            linear.input[0] = x
        removed.add(id(bn))
    return _without_nodes(model, removed)


# --- Pad into Conv ---------------------------------------------------------------------------
def _zero_pad_amounts(pad, consts, rank: int) -> list[int] | None:
    """Per-axis pads [b0.., e0..] of a constant-mode zero Pad, or None if it is anything else."""
    mode = _attr(pad, "mode", b"constant")
    if mode not in (b"constant", "constant"):
        return None
    if len(pad.input) > 1:  # opset >= 11: pads, constant_value, axes are inputs
        pads = consts.get(pad.input[1])
        value = consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        axes = consts.get(pad.input[3]) if len(pad.input) > 3 and pad.input[3] else None
        if pads is None or value is None or (len(pad.input) > 3 and pad.input[3] and axes is None):
            return None
    else:
        pads, value, axes = _attr(pad, "pads"), np.array(_attr(pad, "value", 0.0)), None
    if pads is None or np.any(np.asarray(value) != 0):
        return None
    pads = [int(p) for p in np.asarray(pads).ravel()]
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.asarray(axes).ravel()]
    if len(pads) != 2 * len(axes):
        return None
    full = [0] * (2 * rank)
    for k, a in enumerate(axes):
        full[a], full[rank + a] = pads[k], pads[len(axes) + k]
    return full


def merge_pad_into_conv(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold a zero, constant-mode Pad of spatial axes only into the pads of the Conv it feeds.

    This is how TF-style SAME padding (EfficientNet) exports; one Conv with its own pads is
    what the rules expect.
    """
    g = model.graph
    outputs = {o.name for o in g.output}
    hidden = _subgraph_inputs(g)
    consts = _constants(g)
    users = _consumers(g)
    removed = set()
    for pad in [n for n in g.node if n.op_type == "Pad" and _is_onnx(n)]:
        y = pad.output[0]
        if len(users[y]) != 1 or y in outputs or y in hidden:
            continue
        conv = users[y][0]
        if conv.op_type != "Conv" or not _is_onnx(conv) or conv.input[0] != y or y in conv.input[1:]:
            continue
        w = consts.get(conv.input[1])
        if w is None or not _auto_pad_free(conv):
            continue
        rank = w.ndim
        amounts = _zero_pad_amounts(pad, consts, rank)
        if amounts is None or min(amounts) < 0 or any(amounts[a] or amounts[rank + a] for a in (0, 1)):
            continue
        # Both layouts list all begins, then all ends; the Pad's also cover batch and channels.
        old = list(_attr(conv, "pads", None) or [0] * 2 * (rank - 2))
        if _attr(conv, "auto_pad", b"NOTSET") in (b"VALID", "VALID"):
            old = [0] * len(old)
        begins, ends = amounts[2:rank], amounts[rank + 2:]
        _set_attr(conv, "pads", [p + q for p, q in zip(old, begins + ends)])
        _set_attr(conv, "auto_pad", "NOTSET")
        conv.input[0] = pad.input[0]
        removed.add(id(pad))
    return _without_nodes(model, removed)


# --- Identity and Dropout ----------------------------------------------------------------
def _is_passthrough(node, consts, used: set[str]) -> bool:
    if node.op_type not in PASSTHROUGH or not _is_onnx(node):
        return False
    if node.op_type == "Identity":
        return True
    if len(node.output) > 1 and node.output[1] in used:
        return False  # the mask is read: Dropout is doing real work
    if len(node.input) > 2 and node.input[2]:
        mode = consts.get(node.input[2])
        return mode is not None and not bool(np.asarray(mode).any())  # inference mode only
    return True


def drop_passthrough(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Identity and inference-mode Dropout nodes, rewiring their consumers.

    A node whose output is a graph output stays: renaming graph outputs would break callers.
    So does a Dropout in training mode or one whose mask is used.
    """
    g = model.graph
    outputs = {o.name for o in g.output}
    used = {i for n in g.node for i in n.input} | outputs | _subgraph_inputs(g)
    consts = _constants(g)
    rename, keep = {}, []
    for node in g.node:
        if node.output[0] not in outputs and _is_passthrough(node, consts, used):
            src = node.input[0]
            rename[node.output[0]] = rename.get(src, src)
            continue
        keep.append(node)
    if not rename:
        return model
    del g.node[:]
    g.node.extend(keep)
    _rename_inputs(g, rename)
    return remove_dead_code(model)


def canonize(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for rewrite in REWRITES:
        m = rewrite(m)
    return m


# Constants first, so that Pad amounts and BN statistics computed by subgraphs are known;
# passthroughs next, so that Conv -> Identity -> BN is adjacent.
REWRITES = [fold_constants, drop_passthrough, merge_pad_into_conv, fold_batchnorm]


# --- If with a constant condition -----------------------------------------------------------
def inline_constant_ifs(model: onnx.ModelProto, known: dict | None = None) -> onnx.ModelProto:
    """Replace each top-level If whose condition is a constant (or given in `known`, tensor
    -> value) by the nodes of the branch it takes, the branch's own tensors renamed under
    the If's name; the If's outputs keep their names (Identity from the branch outputs).
    Loops unrolled by iteration number leave such Ifs (an even/odd step), a model
    specialised to its input shapes too (an If on a Shape), and plain nodes are what every
    rule family handles."""
    g = model.graph
    consts = {**_constants(g), **(known or {})}
    nodes, changed = [], False

    def initializer(name, value):
        fresh = _fresh_name(g, name)
        _add_initializer(g, fresh, value)
        return fresh

    for node in g.node:
        cond = consts.get(node.input[0]) if node.op_type == "If" and _is_onnx(node) and node.input else None
        if cond is None or np.asarray(cond).size != 1:
            nodes.append(node)
            continue
        branch = _attr(node, "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch")
        prefix = f"{node.name or 'If'}/inlined/"
        rename = {}
        nodes.extend(_inlined(branch, prefix, rename, initializer))
        for out, vi in zip(node.output, branch.output):
            if out:
                nodes.append(helper.make_node("Identity", [rename.get(vi.name, vi.name)], [out], name=f"{prefix}{out}"))
        changed = True
    if not changed:
        return model
    del g.node[:]
    g.node.extend(nodes)
    return remove_dead_code(model)


# --- Loop and Scan unrolled into plain nodes --------------------------------------------
# A bound on the unrolled size: iterations times body nodes.
MAX_UNROLLED_NODES = 50_000


class _Unrolled(Exception):
    """Why a loop cannot be unrolled (becomes a typed error in the compiler)."""


def _static_value(graph, name: str, known: dict, emitted: dict, depth: int = 0):
    """The value of `name` when it is fixed once the shapes are: a constant, a Shape of
    static axes, or a deterministic node of such values; else None. `known` caches
    values; `emitted` maps names produced by unrolled nodes to their node."""
    if not name:
        return None
    if name in known:
        return known[name]
    value = graph.constant(name)
    if value is None and depth < 64:
        node = emitted.get(name) or graph.producer.get(name)
        value = _static_node_value(graph, node, name, known, emitted, depth) if node is not None else None
    known[name] = value
    return value


def _static_node_value(graph, node, name, known, emitted, depth):
    from .graph import subgraphs

    if not _is_onnx(node) or subgraphs(node) or node.op_type in NONDETERMINISTIC:
        return None
    if node.op_type == "Constant":
        return _constant_node_value(node)
    if node.op_type in ("Shape", "Size"):
        shape = graph.shape(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Shape":
            shape = shape[_attr(node, "start", 0):_attr(node, "end", None)]
        if not all(isinstance(d, int) for d in shape):
            return None
        value = np.array(shape if node.op_type == "Shape" else int(np.prod(shape)), dtype=np.int64)
        return value
    if node.op_type in ("Gather", "Slice") and node.input[0] not in known:
        # An element of a shape with a symbolic batch: static if the elements taken are.
        dims = _shape_dims(graph, node.input[0], emitted)
        rest = [_static_value(graph, i, known, emitted, depth + 1) if i else None for i in node.input[1:]]
        if dims is not None and all(v is not None or not i for v, i in zip(rest, node.input[1:])):
            pos = np.arange(len(dims))
            if node.op_type == "Gather":
                picked = np.take(pos, rest[0].astype(np.int64)) if _attr(node, "axis", 0) == 0 else None
            else:
                (start, end), axes, steps = rest[:2], rest[2] if len(rest) > 2 else None, \
                    rest[3] if len(rest) > 3 else None
                ok = axes is None or all(int(a) in (0, -1) for a in np.ravel(axes))
                step = int(np.ravel(steps)[0]) if steps is not None else 1
                picked = pos[int(np.ravel(start)[0]):int(np.ravel(end)[0]):step] if ok else None
            if picked is not None and all(isinstance(dims[k], int) for k in np.ravel(picked)):
                return np.vectorize(lambda k: dims[k], otypes=[np.int64])(picked) if np.ndim(picked) \
                    else np.array(dims[int(picked)], dtype=np.int64)
    ins = []
    for i in node.input:
        v = _static_value(graph, i, known, emitted, depth + 1) if i else None
        if i and v is None:
            return None
        ins.append(v)
    if _predicted_bytes(node, ins) > 1 << 20:
        return None
    result = _evaluate(node, ins, graph.model.opset_import)
    if result is None:
        return None
    for o, v in zip(node.output, result):
        if o:
            known[o] = v
    return known.get(name)


def _shape_dims(graph, name: str, emitted: dict):
    """The dims (int, or None where symbolic) that a Shape node outputs as `name`, else None."""
    node = emitted.get(name) or graph.producer.get(name)
    if node is None or node.op_type != "Shape" or not _is_onnx(node):
        return None
    shape = graph.shape(node.input[0])
    if shape is None:
        return None
    return [d if isinstance(d, int) else None for d in shape[_attr(node, "start", 0):_attr(node, "end", None)]]


def _copy_renamed(node, rename: dict, name: str):
    """A copy of a body node, named `name`, whose body-local names (inputs, outputs, and
    references inside its own subgraphs) carry the iteration's names."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = name
    for k, i in enumerate(copy.input):
        if i in rename:
            copy.input[k] = rename[i]
    for k, o in enumerate(copy.output):
        if o:
            copy.output[k] = rename[o]
    for a in copy.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            _rename_inputs(sub, rename)
    return copy


def _inlined(body, prefix: str, rename: dict, const) -> list:
    """Copies of a subgraph's nodes to inline under `prefix`: each initializer becomes the
    tensor const(prefixed name, value) returns, each node output is prefixed, and `rename`
    (updated in place) maps every body name to its inlined one."""
    for t in body.initializer:
        rename[t.name] = const(prefix + t.name, numpy_helper.to_array(t))
    for n in body.node:
        for o in n.output:
            if o:
                rename[o] = prefix + o
    return [_copy_renamed(n, rename, f"{prefix}{n.name or n.op_type}_{k}") for k, n in enumerate(body.node)]


class _LoopUnroller:
    def __init__(self, graph):
        self.graph = graph
        self.known: dict = {}
        self.emitted: dict = {}
        self.nodes: list = []
        self.count = 0

    def const(self, name: str, value) -> str:
        node = helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(value)))
        self.emit(node)
        return name

    def emit(self, node) -> None:
        self.count += 1
        if self.count > MAX_UNROLLED_NODES:
            raise _Unrolled(f"unrolled it would exceed {MAX_UNROLLED_NODES} nodes")
        self.nodes.append(node)
        for o in node.output:
            if o:
                self.emitted[o] = node

    def body(self, loop, body, feeds: dict, it: str) -> dict:
        """Emit one iteration: `feeds` maps body inputs to tensors; returns body outputs'
        names in this iteration."""
        prefix = f"{loop.name}/{it}/"
        rename = dict(feeds)
        for n in _inlined(body, prefix, rename, self.const):
            self.emit(n)
        return [rename.get(o.name, o.name) for o in body.output]

    def stack(self, name: str, parts: list, axis: int) -> None:
        ups = []
        for k, p in enumerate(parts):
            up = f"{name}/unrolled/unsqueeze_{k}"
            self.emit(helper.make_node("Unsqueeze", [p, self.ints(f"{name}/unrolled/axes", [axis])], [up], name=up))
            ups.append(up)
        self.emit(helper.make_node("Concat", ups, [name], name=f"{name}/unrolled/concat", axis=axis))

    def ints(self, name: str, values) -> str:
        if name not in self.emitted:
            self.const(name, np.asarray(values, dtype=np.int64))
        return name

    def truth(self, name: str, loop) -> bool:
        v = _static_value(self.graph, name, self.known, self.emitted)
        if v is None:
            raise _Unrolled("its loop condition is computed at run time (data-dependent termination)")
        return bool(np.asarray(v).reshape(-1)[0])

    def loop(self, node) -> None:
        body = _attr(node, "body")
        m, cond = node.input[0] if node.input else "", node.input[1] if len(node.input) > 1 else ""
        n_state = len(node.input) - 2
        trips = _static_value(self.graph, m, self.known, self.emitted) if m else None
        if m and trips is None:
            raise _Unrolled("its trip count is known only at run time")
        trips = None if trips is None else int(np.asarray(trips).reshape(-1)[0])
        if trips is None and not cond:
            raise _Unrolled("it has neither a trip count nor a condition (an endless loop)")
        states = list(node.input[2:])
        running = self.truth(cond, node) if cond else True
        cond_name = cond or self.const(f"{node.name}/cond_true", np.array(True))
        scans = [[] for _ in range(len(body.output) - 1 - n_state)]
        i = 0
        while running and (trips is None or i < trips):
            it = f"iter{i}"
            feeds = {body.input[0].name: self.const(f"{node.name}/{it}/iteration", np.array(i, dtype=np.int64)),
                     body.input[1].name: cond_name}
            feeds.update({vi.name: s for vi, s in zip(body.input[2:], states)})
            outs = self.body(node, body, feeds, it)
            cond_name, states = outs[0], outs[1:1 + n_state]
            for k, s in enumerate(outs[1 + n_state:]):
                scans[k].append(s)
            i += 1
            if cond:
                running = self.truth(cond_name, node)
            if i > MAX_UNROLLED_NODES:
                raise _Unrolled(f"it runs more than {MAX_UNROLLED_NODES} iterations")
        for out, s in zip(node.output[:n_state], states):
            if out:
                self.emit(helper.make_node("Identity", [s], [out], name=f"{out}/unrolled/final"))
        for out, parts in zip(node.output[n_state:], scans):
            if not out:
                continue
            if not parts:
                raise _Unrolled("it runs no iteration, so its scan outputs are empty tensors of unknown shape")
            self.stack(out, parts, 0)

    def scan(self, node) -> None:
        body = _attr(node, "body")
        n_scan = _attr(node, "num_scan_inputs")
        n_state = len(node.input) - n_scan
        xs = list(node.input[n_state:])
        in_axes = list(_attr(node, "scan_input_axes", None) or [0] * n_scan)
        in_dirs = list(_attr(node, "scan_input_directions", None) or [0] * n_scan)
        n_out = len(body.output) - n_state
        out_axes = list(_attr(node, "scan_output_axes", None) or [0] * n_out)
        out_dirs = list(_attr(node, "scan_output_directions", None) or [0] * n_out)
        shape = self.graph.shape(xs[0])
        length = None
        if shape is not None:
            length = shape[in_axes[0] % len(shape)]
        if not isinstance(length, int):
            raise _Unrolled(f"the length of its scanned axis is known only at run time (shape {shape})")
        states = list(node.input[:n_state])
        scans = [[None] * length for _ in range(n_out)]
        for t in range(length):
            it = f"step{t}"
            feeds = {vi.name: s for vi, s in zip(body.input[:n_state], states)}
            for j, (x, vi) in enumerate(zip(xs, body.input[n_state:])):
                pos = t if not in_dirs[j] else length - 1 - t
                el = f"{node.name}/{it}/scan_in_{j}"
                self.emit(helper.make_node("Gather", [x, self.const(el + "/index", np.array(pos, dtype=np.int64))],
                                           [el], name=el, axis=int(in_axes[j])))
                feeds[vi.name] = el
            outs = self.body(node, body, feeds, it)
            states = outs[:n_state]
            for k, s in enumerate(outs[n_state:]):
                scans[k][t if not out_dirs[k] else length - 1 - t] = s
        for out, s in zip(node.output[:n_state], states):
            if out:
                self.emit(helper.make_node("Identity", [s], [out], name=f"{out}/unrolled/final"))
        for k, out in enumerate(node.output[n_state:]):
            if out:
                if length == 0:
                    raise _Unrolled("its scanned axis is empty")
                self.stack(out, scans[k], int(out_axes[k]))


def unroll_loops(graph, names) -> onnx.ModelProto:
    """The model of `graph` (a Graph specialised to its input shapes) with the Loop and Scan
    nodes named in `names` replaced by their iterations as plain nodes; every output and
    every tensor outside the loops keeps its name and value.

    A Loop unrolls when its trip count and its condition are fixed once the shapes are (a
    constant, a Shape of a static axis, a counter compared with one); a Scan when its
    scanned axis is static. Raises ValueError naming the node and the reason otherwise.
    """
    names = set(names)
    unroller = _LoopUnroller(graph)
    for node in graph.nodes:
        if node.name in names and _is_onnx(node) and node.op_type in ("Loop", "Scan"):
            try:
                unroller.loop(node) if node.op_type == "Loop" else unroller.scan(node)
            except _Unrolled as exc:
                raise ValueError(f"{node.op_type} node '{node.name}' cannot be unrolled ({exc})") from None
        else:
            unroller.nodes.append(node)
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    del model.graph.node[:]
    model.graph.node.extend(unroller.nodes)
    return model


def _fixed_by_shapes(graph, name: str, inner: dict | None = None) -> bool:
    """Whether `name` is computed from constants and the shapes of tensors only (never
    from the values of the inputs), so that the input shapes fix it. `inner` maps tensors
    of a loop body to their producing body nodes (searched first)."""
    from .graph import node_inputs

    todo, seen = [name], set()
    inputs = set(graph.inputs)
    while todo:
        t = todo.pop()
        if not t or t in seen or graph.constant(t) is not None:
            continue
        seen.add(t)
        node = (inner or {}).get(t) or graph.producer.get(t)
        if node is None:
            if t in inputs or inner is None:
                return False
            continue  # a body input: the caller decides about those
        if node.op_type in ("Shape", "Size"):
            continue
        if node.op_type in NONDETERMINISTIC:
            return False
        todo.extend(node_inputs(node))
    return True


def loop_blocker(graph, node) -> str | None:
    """Why a Loop cannot be unrolled whatever the input shapes (its trip count or its end
    read the values of the inputs), or None where the input shapes decide it. A Scan's
    length is always an input shape."""
    if node.op_type != "Loop":
        return None
    body = _attr(node, "body")
    m = node.input[0] if node.input else ""
    cond = node.input[1] if len(node.input) > 1 else ""
    if m and not _fixed_by_shapes(graph, m):
        return "its trip count is computed from the values of the inputs"
    if cond and not _fixed_by_shapes(graph, cond):
        return "its initial condition is computed from the values of the inputs"
    if not m and not cond:
        return "it has neither a trip count nor a condition"
    # The body's condition must follow from the iteration number, constants, shapes and
    # loop-carried values that themselves do (a counter), never from the data.
    produced = {o: n for n in body.node for o in n.output if o}
    state_in = [vi.name for vi in body.input[2:]]
    state_out = [vi.name for vi in body.output[1:1 + len(state_in)]]
    initial = dict(zip(state_in, node.input[2:]))
    checked, todo = set(), [body.output[0].name]
    while todo:
        t = todo.pop()
        if t in checked:
            continue
        checked.add(t)
        if t == body.input[0].name:
            continue
        if t == body.input[1].name:
            if cond and not _fixed_by_shapes(graph, cond):
                return "its end depends on the data"
            todo.append(body.output[0].name)
            continue
        if t in initial:
            if not _fixed_by_shapes(graph, initial[t]):
                return "its end depends on the data"
            todo.append(state_out[state_in.index(t)])
            continue
        if any(i.name == t for i in body.initializer):
            continue
        n = produced.get(t)
        if n is None:
            if not _fixed_by_shapes(graph, t):
                return "its end depends on the data"
            continue
        if n.op_type in ("Shape", "Size"):
            continue
        if n.op_type in NONDETERMINISTIC:
            return "its end depends on a random draw"
        from .graph import node_inputs

        todo.extend(node_inputs(n))
    return None
