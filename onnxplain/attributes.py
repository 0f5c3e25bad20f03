"""Reading a node's attributes, for every layer: it imports nothing of onnxplain, so that
graph-level modules (contrib_types, which graph.py imports) and the rules share one reader
without an import cycle through the rules package."""

from __future__ import annotations

import onnx
from onnx import helper


def _decode(v):
    return v.decode() if isinstance(v, bytes) else v


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return _decode(helper.get_attribute_value(a))
    return default
