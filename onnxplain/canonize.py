"""Semantics-preserving rewrites that make rules apply cleanly.

Each rewrite takes and returns an onnx.ModelProto and must leave the model's outputs
unchanged (tests/test_canonize.py checks every one on exported models).
"""

from __future__ import annotations

import onnx

PASSTHROUGH = ("Identity", "Dropout")


def drop_passthrough(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Identity and (inference-mode) Dropout nodes, rewiring their consumers.

    A node whose output is a graph output stays: renaming graph outputs would break callers.
    """
    g = model.graph
    outputs = {o.name for o in g.output}
    rename = {}
    keep = []
    for node in g.node:
        if (node.op_type in PASSTHROUGH and node.domain in ("", "ai.onnx") and node.output[0] not in outputs
                and (node.op_type == "Identity" or len(node.output) == 1 or not node.output[1])):
            src = node.input[0]
            rename[node.output[0]] = rename.get(src, src)
            continue
        keep.append(node)
    if not rename:
        return model
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del g.node[:]
    g.node.extend(keep)
    return model


def canonize(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for rewrite in REWRITES:
        m = rewrite(m)
    return m


REWRITES = [drop_passthrough]
