"""Load ONNX models safely and hold them as a layer-wise representation.

Nothing here knows about explanations: a `Graph` is the forward model, its nodes in
topological order, its constants as numpy arrays and the shape and dtype of every tensor
that shape inference could determine.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference, version_converter

from . import contrib_types
from .errors import InputError, ModelError

# Backward rules use operators in their opset-17 form or later (ScatterElements with
# reduction="add" needs 16); older models are converted up on load and checked to compute
# the same outputs (tests/test_graph.py).
MIN_OPSET = 17
MAX_OPSET = 21
MAX_MODEL_BYTES = 2 * 1024**3  # protobuf's own limit for one message
BATCH = "N"

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _fail(msg: str) -> None:
    raise ModelError(msg)


def read_model(source, *, convert: bool = True) -> onnx.ModelProto:
    """Read a model from a path, bytes or a ModelProto; validate it; bring it to MIN_OPSET.

    External data must lie inside the model's own folder: a model file is untrusted input
    and must not make us read arbitrary files.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        base_dir = None
    elif isinstance(source, (bytes, bytearray)):
        model = _parse(bytes(source), "<bytes>")
        base_dir = None
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            _fail(f"model file not found: {path}")
        if not path.is_file():
            _fail(f"model path is not a file: {path}")
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            _fail(f"model file {path} is {size} bytes; models over 2 GB must keep weights as external data")
        model = _parse(path.read_bytes(), str(path))
        base_dir = path.resolve().parent
    else:
        raise ModelError(f"cannot read a model from {type(source).__name__}; give a path, bytes or onnx.ModelProto")

    _load_external_data(model, base_dir)
    if len(model.graph.node) == 0:
        _fail("the model graph has no nodes")
    _list_ir3_initializers(model)
    _sort_nodes(model)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, Exception) as exc:  # checker raises several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _fail(f"the model is not a valid ONNX graph: {first}")
    if convert:
        model = _convert_opset(model)
    return model


def _sort_nodes(model: onnx.ModelProto) -> None:
    """Put the nodes in topological order, as the IR requires and onnxruntime does not
    (its float16 converter writes them out of order)."""
    try:
        ordered = _toposort(model.graph)
    except ModelError:
        return  # the checker names what is wrong
    if [tuple(n.output) for n in ordered] != [tuple(n.output) for n in model.graph.node]:
        copies = [onnx.NodeProto() for _ in ordered]
        for c, n in zip(copies, ordered):
            c.CopyFrom(n)
        del model.graph.node[:]
        model.graph.node.extend(copies)


def _list_ir3_initializers(model: onnx.ModelProto) -> None:
    """IR version 3 wants every initializer also listed as a graph input; exporters of that
    time often skipped it and onnxruntime runs such files anyway. List them, as the IR says."""
    if model.ir_version >= 4:
        return
    listed = {vi.name for vi in model.graph.input}
    for t in model.graph.initializer:
        if t.name not in listed:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:
        raise ModelError(f"{where} is not an ONNX model (protobuf parse failed: {exc})") from None
    if not model.HasField("graph"):
        _fail(f"{where} is not an ONNX model (no graph)")
    return model


def _external_tensors(model):
    yield from _external_in_graph(model.graph)


def _external_in_graph(g):
    # Subgraphs (If/Loop/Scan bodies) may hold external tensors too.
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL:
                yield a.t
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _external_in_graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _external_in_graph(sub)


def _load_external_data(model: onnx.ModelProto, base_dir: Path | None) -> None:
    tensors = list(_external_tensors(model))
    if not tensors:
        return
    if base_dir is None:
        _fail("the model refers to external data files; load it from its path so they can be found")
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc):
            _fail(f"external data of tensor '{t.name}' has an absolute or empty location '{loc}'")
        target = (base_dir / loc).resolve()
        if base_dir not in target.parents:
            _fail(f"external data of tensor '{t.name}' points outside the model's folder ('{loc}')")
        if not target.is_file():
            _fail(f"external data file '{loc}' of tensor '{t.name}' not found next to the model")
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0) or 0)
        if offset < 0 or length < 0 or offset + length > target.stat().st_size:
            _fail(f"external data of tensor '{t.name}' reads past the end of '{loc}'")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
    except Exception as exc:
        raise ModelError(f"cannot read the model's external data: {exc}") from None


def model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _convert_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = model_opset(model)
    if opset == 0:
        if not any(imp.domain not in ("", "ai.onnx") for imp in model.opset_import):
            _fail("the model imports no opset at all; it is not a valid ONNX model")
        # A model of ai.onnx.ml (or other) operators only: nothing to convert, but the
        # explainer's backward nodes are standard operators, so the standard opset is
        # imported too (harmless to a graph that uses none of its operators).
        model.opset_import.append(helper.make_opsetid("", MIN_OPSET))
        return model
    if opset > MAX_OPSET:
        # Newer opsets are accepted as long as the installed onnxruntime runs them.
        return model
    if opset >= MIN_OPSET:
        return model
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:
        raise ModelError(
            f"cannot convert the model from opset {opset} to {MIN_OPSET} ({str(exc).splitlines()[0]}); "
            f"re-export it with opset {MIN_OPSET} or later"
        ) from None
    return converted


_LIGHT_BYTES = 1 << 16  # initializers larger than this are stripped for inference


def infer_types(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """ONNX shape inference without copying the weights.

    `shape_inference.infer_shapes` serializes the model, parses it in C++, and serializes
    and parses the result back: four transient copies of every weight, gigabytes for a
    VGG-16. Shapes and types of an initializer come from its dims and data type alone, so
    the large ones are emptied while inference runs (and restored before returning). The
    result holds the inferred types; its large initializers are empty, so read types from
    it and keep `model` for the weights.
    """
    saved = {}
    for i, t in enumerate(model.graph.initializer):
        if t.ByteSize() > _LIGHT_BYTES and t.HasField("raw_data"):  # ByteSize reads no data
            saved[i] = t.raw_data
            t.ClearField("raw_data")
    try:
        # Operators of other domains (onnxruntime's quantized ones, ai.onnx.ml) get their
        # output types first, so that the standard nodes after them are typed too.
        contrib_types.annotate(model, infer=lambda m: shape_inference.infer_shapes(m, **kwargs))
        return shape_inference.infer_shapes(model, **kwargs)
    finally:
        for i, data in saved.items():
            model.graph.initializer[i].raw_data = data


def tensor_shape(vi) -> tuple | None:
    """(int | str | None, ...) from a ValueInfoProto; None when the rank is unknown."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:  # paddle2onnx writes -1 for "any"
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


class Graph:
    """A forward model: nodes in topological order, constants, shapes and dtypes."""

    def __init__(self, model: onnx.ModelProto, initializers: dict | None = None):
        _name_nodes(model)
        try:
            inferred = infer_types(model, strict_mode=False, data_prop=True)
        except Exception as exc:
            raise ModelError(f"shape inference failed on the model: {str(exc).splitlines()[0]}") from None
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
        for out, new in zip(model.graph.output, inferred.graph.output):
            out.CopyFrom(new)
        del inferred
        self.model = model
        g = model.graph
        self.opset = model_opset(model)
        # `initializers` (from `specialize`) shares the arrays of a graph with the same weights.
        given = initializers or {}
        self.initializers: dict[str, np.ndarray] = {
            t.name: given[t.name] if t.name in given else numpy_helper.to_array(t) for t in g.initializer
        }
        self.inputs = [vi.name for vi in g.input if vi.name not in self.initializers]
        self.outputs = [vi.name for vi in g.output]
        self.nodes = _toposort(g)
        self._info = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            self._info[vi.name] = vi
        self.producer = {}
        self.consumers = defaultdict(list)
        self._constants = dict(self.initializers)
        for node in self.nodes:
            for o in node.output:
                if o:
                    self.producer[o] = node
            # Readers include If/Loop/Scan nodes whose bodies read the tensor implicitly.
            for i in node_inputs(node):
                self.consumers[i].append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_value(node)
                if value is not None:
                    self._constants[node.output[0]] = value

    # --- tensors -------------------------------------------------------------------------
    def shape(self, name: str) -> tuple | None:
        if name in self._constants:
            return tuple(self._constants[name].shape)
        vi = self._info.get(name)
        return tensor_shape(vi) if vi is not None else None

    def elem_type(self, name: str) -> int | None:
        if name in self._constants:
            return helper.np_dtype_to_tensor_dtype(self._constants[name].dtype)
        vi = self._info.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            return None
        return vi.type.tensor_type.elem_type or None

    def is_float(self, name: str) -> bool:
        return self.elem_type(name) in _FLOAT_TYPES

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a tensor fixed at load time (an initializer or a Constant node)."""
        return self._constants.get(name)

    def constants(self) -> dict[str, np.ndarray]:
        """Every tensor fixed at load time, by name."""
        return dict(self._constants)

    def input_shapes(self) -> dict[str, tuple | None]:
        return {n: self.shape(n) for n in self.inputs}

    def tensor_names(self) -> list[str]:
        names = list(self.inputs)
        for node in self.nodes:
            names.extend(o for o in node.output if o)
        return names

    # --- layout: where the batch is ---------------------------------------------------------
    def input_batch_axes(self) -> tuple[dict[str, int | None], int | None]:
        """Each input's batch axis, read off the declared shapes, and the static batch size
        when the model fixes it (a batch-1 export), else None.

        The batch is the first axis of the primary input (its first float input, else its
        first input) when that axis is not a fixed size; another input is batched along the
        axis that carries the same symbol (a state shaped (2, batch, 128) along axis 1), or
        along a free first axis; an input with no such axis (a 0-d sample rate, a fixed
        state) is not batched and is held fixed for every sample. Where the primary input's
        first axis is a fixed size, the batch is static: inputs whose first axis has that
        size are batched along it and run that many rows at a time.
        """
        declared = {n: self.shape(n) for n in self.inputs}
        ranked = [n for n in self.inputs if declared[n] is None or len(declared[n]) > 0]
        primary = next((n for n in ranked if self.is_float(n)), ranked[0] if ranked else None)
        axes: dict[str, int | None] = {n: None for n in self.inputs}
        if primary is None:
            return axes, None
        first = declared[primary][0] if declared[primary] is not None else None
        static = first if isinstance(first, int) else None
        for n, shape in declared.items():
            if shape is None:
                axes[n] = 0 if static is None else None
                continue
            if not shape:
                continue
            if static is not None:
                axes[n] = 0 if shape[0] == static else None
                continue
            named = [i for i, d in enumerate(shape) if isinstance(d, str) and d == first]
            free = [i for i, d in enumerate(shape) if not isinstance(d, int)]
            if isinstance(first, str) and len(named) == 1:
                axes[n] = named[0]
            elif not isinstance(shape[0], int):
                axes[n] = 0
            elif len(free) == 1 and not shape[free[0]] and not first:
                # A state shaped (2, ?, 128) beside an input whose batch is anonymous too:
                # its one free axis. (A named other size, a graph's edge count, is not.)
                axes[n] = free[0]
        return axes, static

    def batch_axis(self, name: str) -> int | None:
        """The batch axis of a tensor of a graph specialised with a symbolic batch: the one
        axis that shape inference carried the batch symbol to; None where no axis provably
        is the batch (a Reshape that merged it, a tensor that does not depend on it)."""
        shape = self.shape(name)
        if shape is None:
            return None
        hits = [i for i, d in enumerate(shape) if d == BATCH]
        return hits[0] if len(hits) == 1 else None

    def probe_shapes(self, shapes: dict[str, tuple], axes: dict, rows: int) -> dict[str, tuple | None]:
        """Every tensor's inferred shape for inputs of `shapes` with `rows` samples along
        their batch axes, all dimensions static; the weights are not copied."""
        saved = {}
        for i, t in enumerate(self.model.graph.initializer):
            if t.ByteSize() > _LIGHT_BYTES and t.HasField("raw_data"):
                saved[i] = t.raw_data
                t.ClearField("raw_data")
        try:
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
        finally:
            for i, data in saved.items():
                self.model.graph.initializer[i].raw_data = data
        del model.graph.value_info[:]
        for vi in model.graph.input:
            if vi.name in shapes:
                shape = list(shapes[vi.name])
                if axes.get(vi.name) is not None:
                    shape[axes[vi.name]] = rows
                vi.type.tensor_type.ClearField("shape")
                for d in shape:
                    vi.type.tensor_type.shape.dim.add().dim_value = int(d)
        for vi in model.graph.output:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
        contrib_types.annotate(model, infer=lambda m: shape_inference.infer_shapes(m, strict_mode=False,
                                                                                  data_prop=True))
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        return {vi.name: tensor_shape(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
                if vi.type.HasField("tensor_type")}

    def specialize(self, shapes: dict[str, tuple], axes: dict | None = None, static: bool = False,
                   fix_others: bool = True) -> "Graph":
        """A copy whose inputs have the given shapes, each input's batch axis (`axes`, by
        default `input_batch_axes`) left symbolic unless `static`.

        Knowing every other dimension lets rules decide broadcasting statically; the
        symbolic batch, tracked by shape inference, tells each tensor's batch axis.
        """
        if axes is None:
            axes = self.input_batch_axes()[0]
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        _clear_value_info(model.graph)
        for vi in model.graph.input:
            if vi.name not in shapes:
                continue
            shape = shapes[vi.name]
            if not vi.type.tensor_type.HasField("shape"):
                for _ in shape:  # the model leaves the rank open: take the array's
                    vi.type.tensor_type.shape.dim.add()
            dims = vi.type.tensor_type.shape.dim
            if len(dims) != len(shape):
                raise InputError(
                    f"input '{vi.name}' has rank {len(dims)} in the model, got an array of rank {len(shape)}"
                )
            for i, (d, s) in enumerate(zip(dims, shape)):
                if i != axes.get(vi.name) and not fix_others and not d.HasField("dim_value"):
                    continue  # the file leaves it free: so does this copy
                d.Clear()
                if i == axes.get(vi.name) and not static:
                    d.dim_param = BATCH
                else:
                    d.dim_value = int(s)
        for vi in model.graph.output:
            # Only tensor outputs are re-inferred; reading `tensor_type` of a sequence or
            # map output (scikit-learn's ZipMap) would turn it into a tensor of type 0.
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
        return Graph(model, initializers=self.initializers)


def _clear_value_info(g) -> None:
    """Drop the inferred types of a graph and of its If/Loop/Scan bodies: after a change of
    input shapes, a stale type inside a body contradicts the new ones."""
    del g.value_info[:]
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _clear_value_info(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _clear_value_info(sub)


def _constant_value(node) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _name_nodes(model: onnx.ModelProto) -> None:
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _toposort(g) -> list:
    available = {vi.name for vi in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    # A node with a subgraph is ready only when the outer-scope tensors its body reads are.
    reads = {id(n): node_inputs(n) for n in pending}
    # Most exported graphs are already sorted: one pass is usually enough.
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in reads[id(node)]):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in reads[id(n)] if i not in available})
            raise ModelError(
                f"the graph has a cycle or uses undefined tensors: {', '.join(missing[:5])}"
            )
        pending = rest
    return ordered


def load(source) -> Graph:
    return Graph(read_model(source))


# --- subgraphs: what If/Loop/Scan bodies read from the enclosing scope ---------------------
def subgraphs(node) -> list:
    """The GraphProto attributes of a node (If branches, Loop and Scan bodies)."""
    found = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            found.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            found.extend(a.graphs)
    return found


def graph_outer_reads(g) -> list[str]:
    """Names that graph `g` (its nodes, nested subgraphs and outputs) reads without
    defining them: the tensors of enclosing scopes it uses, in first-use order."""
    defined = {vi.name for vi in g.input} | {t.name for t in g.initializer} | {""}
    defined |= {t.name for t in getattr(g, "sparse_initializer", ())}
    reads: dict[str, None] = {}
    for n in g.node:
        for name in node_inputs(n):
            if name not in defined:
                reads.setdefault(name)
        defined.update(n.output)
    for vi in g.output:
        if vi.name not in defined:
            reads.setdefault(vi.name)
    return list(reads)


def implicit_inputs(node) -> list[str]:
    """Outer-scope tensors a node's subgraphs read (recursively): inputs the node has
    without listing them. Empty for a node without subgraphs."""
    reads: dict[str, None] = {}
    for sub in subgraphs(node):
        for name in graph_outer_reads(sub):
            reads.setdefault(name)
    explicit = set(node.input)
    return [n for n in reads if n not in explicit]


def node_inputs(node) -> list[str]:
    """Every tensor a node reads: its explicit inputs (non-empty) and then its implicit ones."""
    explicit = [i for i in node.input if i]
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return explicit
    return list(dict.fromkeys(explicit + implicit_inputs(node)))


def subgraph_op_types(node) -> set[str]:
    """The operator types inside a node's subgraphs, nested ones included."""
    found = set()
    for sub in subgraphs(node):
        for n in sub.node:
            found.add(n.op_type)
            found |= subgraph_op_types(n)
    return found


# --- embeddings: where a token model becomes float ---------------------------------------
_INDEX_PASSING = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity")


def find_embeddings(graph: "Graph") -> list[str]:
    """Outputs of the embedding lookups of a model with integer inputs: each `Gather` whose
    data is a constant 2-D float table and whose indices are an integer graph input (or
    one reshaped or cast on its way), in topological order."""
    int_inputs = {n for n in graph.inputs if graph.elem_type(n) not in _FLOAT_TYPES | {None}}
    found = []
    for node in graph.nodes:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        table = graph.constant(node.input[0])
        if table is None or table.ndim != 2 or table.dtype.kind != "f":
            continue
        idx = node.input[1]
        while idx not in int_inputs:
            prod = graph.producer.get(idx)
            if prod is None or prod.op_type not in _INDEX_PASSING or not prod.input:
                break
            idx = prod.input[0]
        if idx in int_inputs:
            found.append(node.output[0])
    return found
