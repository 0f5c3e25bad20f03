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


class Step:
    """A fixed number of rows per run, for `runtime.chunked` (the explainer's own rows per
    run, which the composed graph's bound inputs would otherwise inflate)."""

    def __init__(self, rows: int):
        self.rows = rows

    def rows_per_run(self, cap=None) -> int:
        return self.rows


class Program:
    """A composed explainer (see `compose`) and its session; `run` chunks the rows."""

    def __init__(self, spec, session, squares: bool):
        self.spec, self.session, self.squares = spec, session, squares

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

        def run_chunk(start, stop):
            ia, ib, alpha, w = chunk_rows(start, stop)
            feeds = {P + "ia": ia.astype(np.int64), P + "ib": ib.astype(np.int64),
                     P + "alpha": alpha.astype(np.float32), P + "W": w.astype(np.float32)}
            return s.run_bound(resident, feeds, outs)

        for _start, _stop, out in chunked(Step(rows_per_run), total, run_chunk, label, None):
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


def compose_occlusion(model: onnx.ModelProto, explained: str, k: str, held: list, seed_rank: int, dims: tuple,
                      window: tuple) -> onnx.ModelProto:
    """The forward model scoring occluded rows built on the device: row j is input k of
    sample ia_j with the window whose corner is lo_j (one start per non-batch axis) set to
    the baseline; its score is sum(seed[ia_j] * explained). Inputs bound once: k's values
    and baseline (P+k+'/A', P+k+'/base'), the seed and the held inputs; per chunk ia, lo."""
    src = model
    elem, rank = _elem(src, k)
    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info(P + "ia", TensorProto.INT64, ["m"]),
              helper.make_tensor_value_info(P + "lo", TensorProto.INT64, ["m", len(dims)])]
    for name in (P + k + "/A", P + k + "/base"):
        inputs.append(helper.make_tensor_value_info(name, elem, ["n"] + list(dims)))
    nodes += [helper.make_node("Gather", [P + k + "/A", P + "ia"], [P + "x"], axis=0),
              helper.make_node("Gather", [P + k + "/base", P + "ia"], [P + "b"], axis=0)]
    inside = None
    for a, (d, w) in enumerate(zip(dims, window)):
        if w >= d:
            continue  # the window spans the axis
        shape = [1] * (a + 1) + [d] + [1] * (len(dims) - a - 1)
        inits += [numpy_helper.from_array(np.arange(d, dtype=np.int64).reshape(shape), P + f"pos{a}"),
                  numpy_helper.from_array(np.array([a], np.int64), P + f"axis{a}"),
                  numpy_helper.from_array(np.array([-1] + [1] * len(dims), np.int64), P + f"col{a}"),
                  numpy_helper.from_array(np.array(w, np.int64), P + f"w{a}")]
        nodes += [helper.make_node("Gather", [P + "lo", P + f"axis{a}"], [P + f"lo{a}"], axis=1),
                  helper.make_node("Reshape", [P + f"lo{a}", P + f"col{a}"], [P + f"start{a}"]),
                  helper.make_node("Add", [P + f"start{a}", P + f"w{a}"], [P + f"end{a}"]),
                  helper.make_node("Less", [P + f"pos{a}", P + f"start{a}"], [P + f"before{a}"]),
                  helper.make_node("Less", [P + f"pos{a}", P + f"end{a}"], [P + f"until{a}"]),
                  helper.make_node("Not", [P + f"before{a}"], [P + f"after{a}"]),
                  helper.make_node("And", [P + f"after{a}", P + f"until{a}"], [P + f"in{a}"])]
        if inside is None:
            inside = P + f"in{a}"
        else:
            nodes.append(helper.make_node("And", [inside, P + f"in{a}"], [P + f"inside{a}"]))
            inside = P + f"inside{a}"
    if inside is None:
        nodes.append(helper.make_node("Identity", [P + "b"], [k]))
    else:
        nodes.append(helper.make_node("Where", [inside, P + "b", P + "x"], [k]))
    for h in held:
        e, r = _elem(src, h)
        inputs.append(helper.make_tensor_value_info(P + h + "/A", e, ["n"] + [f"{h}.d{i}" for i in range(1, r)]))
        nodes.append(helper.make_node("Gather", [P + h + "/A", P + "ia"], [h], axis=0))
    inputs.append(helper.make_tensor_value_info(P + "seed/A", TensorProto.FLOAT,
                                                ["n"] + [f"seed.d{i}" for i in range(1, seed_rank)]))
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), P + "flat"))
    tail = [helper.make_node("Gather", [P + "seed/A", P + "ia"], [P + "seed"], axis=0),
            helper.make_node("Cast", [explained], [P + "y32"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [P + "y32", P + "flat"], [P + "yflat"]),
            helper.make_node("Reshape", [P + "seed", P + "flat"], [P + "sflat"]),
            helper.make_node("Mul", [P + "yflat", P + "sflat"], [P + "ys"]),
            ]
    version = max([o.version for o in src.opset_import if o.domain in ("", "ai.onnx")] + [1])
    if version >= 13:
        tail.append(helper.make_node("ReduceSum", [P + "ys", P + "one"], [P + "score"], keepdims=0))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), P + "one"))
    else:
        tail.append(helper.make_node("ReduceSum", [P + "ys"], [P + "score"], keepdims=0, axes=[1]))
    built = {k} | set(held)
    inputs += [v for v in src.graph.input if v.name not in built]
    outputs = [helper.make_tensor_value_info(P + "score", TensorProto.FLOAT, ["m"])]
    graph = helper.make_graph(nodes + list(src.graph.node) + tail, src.graph.name + "_occlusion", inputs, outputs,
                              initializer=list(src.graph.initializer) + inits)
    out = helper.make_model(graph, opset_imports=list(src.opset_import))
    out.ir_version = src.ir_version
    return out
