"""Multi-pass explainers whose state stays on the device.

Integrated gradients and SmoothGrad run one explainer over many rows that are all built
from a few arrays: row j of input k is A_k[ia_j] + alpha_j * B_k[ib_j] (IG: A the baseline,
B the input minus the baseline, alpha the integration point; SmoothGrad: A the input, B
the noise draws, alpha 1), and all they keep of a row's attribution h_j is a weighted sum
per sample, S[s] = sum_j W[s, j] h_j (and the sum of squares, for SmoothGrad's variants).

A `Program` is the explainer with those two ends in its graph: A, B, the seed and the
other inputs are bound once as values on the device (onnxruntime I/O binding), a chunk
feeds only its index vectors, alphas and the small weight matrix W, and only the per-sample
sums come back. On a GPU nothing sample-sized crosses the bus per chunk. It serves models
whose tensors are batch first; others run the plain path (`Context.backward_rows`).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

P = "onnxplain.resident/"


def wanted(session) -> bool:
    """Whether multi-pass state should live on the device: by default where the session
    runs on CUDA; ONNXPLAIN_RESIDENT=1 / 0 forces it on (for tests, on the CPU) or off."""
    env = os.environ.get("ONNXPLAIN_RESIDENT")
    if env in ("0", "1"):
        return env == "1"
    return session.device == "cuda"


def _elem(model: onnx.ModelProto, name: str) -> tuple[int, int]:
    vi = next(v for v in model.graph.input if v.name == name)
    t = vi.type.tensor_type
    return t.elem_type, len(t.shape.dim)


def compose(spec, moved: list, held: list, times_input: bool, squares: bool) -> onnx.ModelProto:
    """The explainer `spec` with its rows built from bound arrays and its attributions summed
    per sample. `moved`: inputs built as A + alpha * B; `held`: inputs (and the seed) gathered
    from A alone."""
    src = spec.model
    built = set(moved) | set(held) | ({spec.seed} if spec.seed else set())
    nodes, inits, inputs = [], [], []

    def vi(name, elem, rank, first="n"):
        return helper.make_tensor_value_info(name, elem, [first] + [f"{name}.d{i}" for i in range(1, rank)])

    inputs += [helper.make_tensor_value_info(P + "ia", TensorProto.INT64, ["m"]),
               helper.make_tensor_value_info(P + "ib", TensorProto.INT64, ["m"]),
               helper.make_tensor_value_info(P + "alpha", TensorProto.FLOAT, ["m"]),
               helper.make_tensor_value_info(P + "W", TensorProto.FLOAT, ["n", "m"])]
    for k in moved:
        elem, rank = _elem(src, k)
        inputs += [vi(P + k + "/A", elem, rank), vi(P + k + "/B", elem, rank, "nb")]
        shape = P + k + "/alpha_shape"
        inits.append(numpy_helper.from_array(np.array([-1] + [1] * (rank - 1), np.int64), shape))
        alpha = P + "alpha"
        if elem != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [alpha], [P + k + "/alpha_cast"], to=elem))
            alpha = P + k + "/alpha_cast"
        nodes += [helper.make_node("Gather", [P + k + "/A", P + "ia"], [P + k + "/a"], axis=0),
                  helper.make_node("Gather", [P + k + "/B", P + "ib"], [P + k + "/b"], axis=0),
                  helper.make_node("Reshape", [alpha, shape], [P + k + "/alpha"]),
                  helper.make_node("Mul", [P + k + "/alpha", P + k + "/b"], [P + k + "/ab"]),
                  helper.make_node("Add", [P + k + "/a", P + k + "/ab"], [k])]
    for k in held + ([spec.seed] if spec.seed else []):
        elem, rank = _elem(src, k)
        inputs.append(vi(P + k + "/A", elem, rank))
        nodes.append(helper.make_node("Gather", [P + k + "/A", P + "ia"], [k], axis=0))
    inputs += [v for v in src.graph.input if v.name not in built]

    outputs, tail = [], []
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), P + "flat"))
    for t, o in spec.attributions.items():
        h = o
        if times_input:
            tail.append(helper.make_node("Mul", [o, t], [P + o + "/h"]))
            h = P + o + "/h"
        tail += [helper.make_node("Reshape", [h, P + "flat"], [P + o + "/flat"]),
                 helper.make_node("Cast", [P + o + "/flat"], [P + o + "/flat32"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", [P + "W", P + o + "/flat32"], [P + o + "/s1"])]
        outputs.append(helper.make_tensor_value_info(P + o + "/s1", TensorProto.FLOAT, ["n", "D"]))
        if squares:
            tail += [helper.make_node("Mul", [P + o + "/flat32", P + o + "/flat32"], [P + o + "/sq"]),
                     helper.make_node("MatMul", [P + "W", P + o + "/sq"], [P + o + "/s2"])]
            outputs.append(helper.make_tensor_value_info(P + o + "/s2", TensorProto.FLOAT, ["n", "D"]))

    graph = helper.make_graph(nodes + list(src.graph.node) + tail, src.graph.name + "_resident", inputs, outputs,
                              initializer=list(src.graph.initializer) + inits)
    model = helper.make_model(graph, opset_imports=list(src.opset_import))
    model.ir_version = src.ir_version
    return model


class Program:
    """A composed explainer (see `compose`) and its session; `run` chunks the rows."""

    def __init__(self, spec, session, moved: list, held: list, times_input: bool, squares: bool):
        self.spec, self.session = spec, session
        self.moved, self.held, self.squares = moved, held, squares

    def run(self, arrays: dict, total: int, chunk_rows, rows_per_run: int, label=None) -> tuple[dict, dict]:
        """arrays: bound name -> host array (P + k + '/A' ...); chunk_rows(start, stop) ->
        (ia, ib, alpha, W). Returns the per-sample sums S1 (and S2) by attributed tensor,
        flattened to (n, D)."""
        from .runtime import chunked

        s = self.session
        resident = {k: s.on_device(v) for k, v in arrays.items()}
        outs = [P + o + "/s1" for o in self.spec.attributions.values()]
        if self.squares:
            outs += [P + o + "/s2" for o in self.spec.attributions.values()]
        s1, s2 = {}, {}

        class _Step:
            def rows_per_run(self, cap=None):
                return rows_per_run

        def run_chunk(start, stop):
            ia, ib, alpha, w = chunk_rows(start, stop)
            feeds = {P + "ia": ia.astype(np.int64), P + "ib": ib.astype(np.int64),
                     P + "alpha": alpha.astype(np.float32), P + "W": w.astype(np.float32)}
            return s.run_bound(resident, feeds, outs)

        for _start, _stop, out in chunked(_Step(), total, run_chunk, label, None):
            for t, o in self.spec.attributions.items():
                part = out[P + o + "/s1"].astype(np.float64)
                s1[t] = part if t not in s1 else s1[t] + part
                if self.squares:
                    sq = out[P + o + "/s2"].astype(np.float64)
                    s2[t] = sq if t not in s2 else s2[t] + sq
        return s1, s2


def onehot_weights(sample: np.ndarray, n: int, w: np.ndarray | None = None) -> np.ndarray:
    """W (n, m): W[s, j] = w_j where row j belongs to sample s."""
    out = np.zeros((n, len(sample)), np.float32)
    out[sample, np.arange(len(sample))] = 1.0 if w is None else w
    return out
