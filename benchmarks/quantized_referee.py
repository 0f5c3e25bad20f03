"""A float64 referee for quantized models: onnx's reference evaluator on the model cast to
float64, with numpy implementations of the quantized operators that onnx.reference lacks
or computes in integers (com.microsoft DynamicQuantizeLSTM; DynamicQuantizeLinear,
ConvInteger, MatMulInteger; the Div -> Floor -> Cast(int) bias quantizer of onnxruntime's
dynamic quantizer), in two modes:

  exact          rounding as onnxruntime rounds: this mode's forward is checked against
                 onnxruntime's, which proves the implementations compute the model;
  straight-through
                 the convention onnxplain documents for quantized operators (onnxplain/
                 rules/quantized.py): the model is differentiated as if rounding were the
                 identity. Here each rounding's error is measured once at the explained
                 input, in real units (the dequantized value minus the real value), and
                 then held fixed: q(x) = (x + e0) / s + z. At the explained input the
                 forward is the quantized model's; around it the model is the dequantized
                 float model shifted by constants, whose finite differences are the
                 straight-through gradient at the quantized point (and a dynamic scale s
                 cancels exactly, as in onnxplain's rule). DynamicQuantizeLSTM is the float
                 LSTM with dequantized weights (its per-step quantization of X and h passed
                 straight through), which is what onnxplain's rule differentiates.

Nothing here reads onnxplain: the referee is the model's own graph evaluated by onnx.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv import _conv_implementation

from onnxplain.rules.base import attr

DOMAIN = "onnxplain.referee"
QUANTIZED_OPS = {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM"}
_INT = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
        onnx.TensorProto.INT32, onnx.TensorProto.INT64}


def needs_referee(model) -> bool:
    """Whether the model holds a quantized operator this referee implements."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def _uint8_params(x):
    """Scale and zero point of onnxruntime's dynamic uint8 quantization of x (its range
    widened to hold 0)."""
    hi, lo = max(0.0, float(np.max(x))), min(0.0, float(np.min(x)))
    scale = 1.0 if hi == lo else (hi - lo) / 255.0
    zero = float(np.rint(np.clip(0.0 - lo / scale, 0, 255)))
    return scale, zero


def _quantize(x, scale, zero):
    return np.clip(np.rint(x / scale) + zero, 0, 255)


def _fuse_bias_quantizers(model):
    """Div(n, d) -> Floor -> Cast(to an integer type), the quantizer of a bias by the
    product of two scales, as one node of DOMAIN (RoundDiv): a float Floor cannot hold its
    rounding error in real units, and the Cast to int would round again."""
    g = model.graph
    by_out = {o: n for n in g.node for o in n.output}
    users = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    drop, fused = set(), {}
    for n in g.node:
        if n.op_type != "Floor":
            continue
        div = by_out.get(n.input[0])
        cast = users.get(n.output[0], [])
        if (div is None or div.op_type != "Div" or len(users.get(div.output[0], [])) != 1 or len(cast) != 1
                or cast[0].op_type != "Cast" or attr(cast[0], "to") not in _INT):
            continue
        drop.update({id(div), id(n), id(cast[0])})
        fused[id(cast[0])] = helper.make_node("RoundDiv", list(div.input), [cast[0].output[0]],
                                              name=f"{n.name or n.output[0]}_referee", domain=DOMAIN)
    nodes = [fused[id(n)] if id(n) in fused else n for n in g.node if id(n) not in drop or id(n) in fused]
    del g.node[:]
    g.node.extend(nodes)
    if fused and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(fused)


def _conv(x, w, node):
    """Conv of float64 x and w with node's geometry: torch's float64 conv2d where it is
    there (onnx.reference's loops take seconds on an OCR model's 21 layers), else
    onnx.reference's implementation."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    strides, dilations = attr(node, "strides"), attr(node, "dilations")
    pads, group = attr(node, "pads"), int(attr(node, "group", 1))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and x.ndim == 4 and auto_pad == "NOTSET":
        pads = list(pads or [0, 0, 0, 0])
        xt = torch.nn.functional.pad(torch.from_numpy(x), (pads[1], pads[3], pads[0], pads[2]))
        y = torch.nn.functional.conv2d(xt, torch.from_numpy(w), stride=tuple(strides or (1, 1)),
                                       dilation=tuple(dilations or (1, 1)), groups=group)
        return y.numpy()
    y = _conv_implementation(x, w, None, auto_pad, dilations, group, attr(node, "kernel_shape"), pads, strides)
    return np.asarray(y, np.float64)


class QuantizedReferee:
    """The float64 model of a quantized model in onnx.reference: run(feeds) in the mode set
    by exact() or straight_through(feeds) (which measures the rounding errors at feeds)."""

    def __init__(self, model64, outputs):
        import copy

        m = copy.deepcopy(model64)
        self.fused = _fuse_bias_quantizers(m)
        if not any(o.domain == "com.microsoft" for o in m.opset_import):
            m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        self.mode = "exact"
        self.recording = False
        self.anchors = {}
        self.errors = {}  # node output -> rounding error in real units, at the explained input
        self.ops = self._ops()
        self.ev = ReferenceEvaluator(m, new_ops=self.ops + STANDARD_FIXES)
        self.outputs = outputs

    def run(self, feeds):
        return self.ev.run(self.outputs, feeds)

    def exact(self):
        self.mode = "exact"
        self.errors = {}

    def straight_through(self, feeds, anchors=None):
        """Switch to the straight-through model, measuring each rounding's error at `feeds`.
        `anchors` (tensor name -> value) gives the integers onnxruntime rounded to, for the
        outputs of rounding operators (and DynamicQuantizeLinear's zero points): the model
        is then linearised at onnxruntime's quantized point, where onnxplain's gradient is
        computed. Without them the referee's own float64 rounding decides, and one value
        that float32 and float64 round to neighbouring integers moves the point a whole
        quantum (ddddocr's LSTM input drifts 2e-2)."""
        self.mode, self.errors, self.recording = "ste", {}, True
        self.anchors = anchors or {}
        try:
            return self.run(feeds)
        finally:
            self.recording = False

    # -- rounding: exact, or the real value shifted by its error at the explained input
    def _round(self, key, real, scale, zero, rounded, zero_key=None):
        """`rounded` is the exact quantized value of real / scale + zero."""
        if self.mode == "exact":
            return rounded
        if self.recording:
            z = zero
            if key in self.anchors and np.shape(self.anchors[key]) == np.shape(rounded):
                rounded = np.asarray(self.anchors[key], np.float64)
                z = float(np.asarray(self.anchors[zero_key], np.float64)) if zero_key in self.anchors else zero
            self.errors[key] = scale * (rounded - z) - real
        e = self.errors.get(key)
        if e is None or np.shape(e) != np.shape(real):
            raise RuntimeError(f"no rounding error recorded for '{key}' at this shape: call straight_through first")
        return (real + e) / scale + zero

    def _ops(self):
        ref = self

        class DynamicQuantizeLinear(OpRun):
            op_domain = ""

            def _run(self, x):
                scale, zero = _uint8_params(x)
                out = self.onnx_node.output
                q = ref._round(out[0], x, scale, zero, _quantize(x, scale, zero), out[2] if len(out) > 2 else None)
                return q, np.array(scale, x.dtype), np.array(zero)

        class ConvInteger(OpRun):
            op_domain = ""

            def _run(self, X, W, x_zero_point=None, w_zero_point=None, **_):
                n = self.onnx_node
                x = np.asarray(X, np.float64) - (0.0 if x_zero_point is None else np.asarray(x_zero_point, np.float64))
                w = np.asarray(W, np.float64)
                if w_zero_point is not None:
                    wz = np.asarray(w_zero_point, np.float64)
                    w = w - (wz.reshape((-1,) + (1,) * (w.ndim - 1)) if wz.ndim else wz)
                return (_conv(x, w, n),)

        class MatMulInteger(OpRun):
            op_domain = ""

            def _run(self, A, B, a_zero_point=None, b_zero_point=None):
                a = np.asarray(A, np.float64)
                b = np.asarray(B, np.float64)
                if a_zero_point is not None:
                    az = np.asarray(a_zero_point, np.float64)
                    a = a - (az.reshape(-1, 1) if az.ndim == 1 and az.size > 1 else az)
                if b_zero_point is not None:
                    b = b - np.asarray(b_zero_point, np.float64)
                return (a @ b,)

        class RoundDiv(OpRun):
            op_domain = DOMAIN

            def _run(self, n, d):
                n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
                # q = floor(n / d) means the real value n stored as q * d: its error in
                # real units is q d - n (zero point 0).
                return (ref._round(self.onnx_node.output[0], n, d, 0.0, np.floor(n / d)),)

        class DynamicQuantizeLSTM(OpRun):
            op_domain = "com.microsoft"

            def _run(self, X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None,
                     W_scale=None, W_zero_point=None, R_scale=None, R_zero_point=None, **_):
                node = self.onnx_node
                if (sequence_lens is not None and np.size(sequence_lens) and
                        np.any(np.asarray(sequence_lens) != X.shape[0])) or P is not None:
                    raise NotImplementedError("the referee's DynamicQuantizeLSTM takes full sequences and no peepholes")
                if attr(node, "activations") or attr(node, "clip") or attr(node, "input_forget", 0) or \
                        attr(node, "layout", 0):
                    raise NotImplementedError("the referee's DynamicQuantizeLSTM takes the default activations, "
                                              "no clip, no input_forget, layout 0")
                return ref._lstm(node, X, W, R, B, initial_h, initial_c, W_scale, W_zero_point, R_scale,
                                 R_zero_point)

        return [DynamicQuantizeLinear, ConvInteger, MatMulInteger, RoundDiv, DynamicQuantizeLSTM]

    def _lstm(self, node, X, W, R, B, h0, c0, ws, wz, rs, rz):
        hidden = int(attr(node, "hidden_size"))
        direction = attr(node, "direction", "forward")
        D = 2 if direction == "bidirectional" else 1
        T, N, _ = X.shape

        def dequantized(q, s, z):  # [D, in, 4H], scale and zero point per direction or per column
            q = np.asarray(q, np.float64)
            s = np.asarray(s, np.float64).reshape(D, -1)[:, None, :]
            z = np.asarray(0 if z is None else z, np.float64)
            z = z.reshape(D, -1)[:, None, :] if z.ndim else z
            return (q - z) * s

        Wd, Rd = dequantized(W, ws, wz), dequantized(R, rs, rz)
        Bv = np.zeros((D, 8 * hidden)) if B is None else np.asarray(B, np.float64)
        h0 = np.zeros((D, N, hidden)) if h0 is None else np.asarray(h0, np.float64)
        c0 = np.zeros((D, N, hidden)) if c0 is None else np.asarray(c0, np.float64)
        exact = self.mode == "exact"

        def qmat(a):
            # onnxruntime quantizes a GEMM's float operand dynamically (uint8, its range
            # widened to 0) before the integer product; the straight-through model does not.
            if not exact:
                return a
            s, z = _uint8_params(a)
            return s * (_quantize(a, s, z) - z)

        sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
        Y = np.zeros((T, D, N, hidden))
        Yh, Yc = np.zeros((D, N, hidden)), np.zeros((D, N, hidden))
        xin = qmat(np.asarray(X, np.float64).reshape(T * N, -1))
        for d in range(D):
            reverse = direction == "reverse" or d == 1
            xw = (xin @ Wd[d]).reshape(T, N, 4 * hidden) + Bv[d, :4 * hidden] + Bv[d, 4 * hidden:]
            h, c = h0[d], c0[d]
            for t in (range(T - 1, -1, -1) if reverse else range(T)):
                gates = xw[t] + qmat(h) @ Rd[d]
                i, o, f, g = np.split(gates, 4, axis=-1)
                c = sig(f) * c + sig(i) * np.tanh(g)
                h = sig(o) * np.tanh(c)
                Y[t, d] = h
            Yh[d], Yc[d] = h, c
        return Y, Yh, Yc


def onnxruntime_values(model, feeds, names) -> dict:
    """The values onnxruntime computes for the named tensors of the model on feeds."""
    import copy

    import onnxruntime as ort

    skip = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    probe = copy.deepcopy(model)
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.ValueInfoProto(name=t) for t in names if t not in skip])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = [o.name for o in sess.get_outputs()]
    return dict(zip(got, sess.run(got, feeds)))


def rounding_anchors(model, feeds) -> dict:
    """onnxruntime's integers at each rounding of the model (QuantizedReferee.straight_through):
    DynamicQuantizeLinear's quantized output and zero point, each bias quantizer's output."""
    import copy

    fused = copy.deepcopy(model)
    _fuse_bias_quantizers(fused)
    names = []
    for n in fused.graph.node:
        if n.op_type == "DynamicQuantizeLinear":
            names += [n.output[0]] + ([n.output[2]] if len(n.output) > 2 else [])
        elif n.domain == DOMAIN:
            names.append(n.output[0])
    return onnxruntime_values(model, feeds, names) if names else {}


def operator_errors(model, feeds) -> dict:
    """Each quantized operator of the model (and each fused bias quantizer) run by this
    referee in exact mode on onnxruntime's own values of its inputs, against onnxruntime's
    outputs: node name -> largest difference over largest value. Checked operator by
    operator because the whole model cannot agree closer than its rounding allows: the
    float64 model rounds values that float32 computes a little differently, and one
    flipped rounding moves a value by a whole quantum (ddddocr's 21 layers drift 1e-2)."""
    import copy

    from onnx import numpy_helper

    fused = copy.deepcopy(model)
    _fuse_bias_quantizers(fused)
    checked = [n for n in fused.graph.node if n.op_type in QUANTIZED_OPS or n.domain == DOMAIN]
    if not checked:
        return {}
    want = sorted({t for n in checked for t in list(n.input) + list(n.output) if t})
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values = {**init, **feeds, **onnxruntime_values(model, feeds, want)}
    errors = {}
    for n in checked:
        ins = [i for i in n.input if i]
        args = {i: (np.asarray(values[i], np.float64) if np.asarray(values[i]).dtype.kind == "f" else values[i])
                for i in ins}
        g = helper.make_graph(
            [n], "one",
            [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype), np.shape(a))
             for i, a in args.items()],
            [onnx.ValueInfoProto(name=o) for o in n.output if o])
        one = helper.make_model(g, opset_imports=list(model.opset_import) +
                                [helper.make_opsetid(DOMAIN, 1)], ir_version=model.ir_version)
        ref = QuantizedReferee(one, [o for o in n.output if o])
        got = ref.run(args)
        err = 0.0
        for o, a in zip([o for o in n.output if o], got):
            b = np.asarray(values[o], np.float64)
            a = np.asarray(a, np.float64)
            err = max(err, float("inf") if a.shape != b.shape else
                      float(np.max(np.abs(a - b), initial=0.0) / max(float(np.max(np.abs(b), initial=0.0)), 1e-30)))
        errors[n.name or n.output[0]] = err
    return errors


class BatchNormalization(OpRun):
    """BatchNormalization as the standard defines it for every opset: inference (the
    stored mean and variance) where the node asks for one output. onnx.reference's
    opset-9 version normalises by the batch's own statistics whenever the node carries a
    `momentum` attribute (paddle2onnx writes one on every inference BatchNormalization:
    rapidocr-rec-v4's forward came out 0.13 off onnxruntime's)."""

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, **_):
        if attr(self.onnx_node, "training_mode", 0) or any(self.onnx_node.output[1:]):
            raise NotImplementedError("the referee's BatchNormalization computes inference mode only")
        eps = float(attr(self.onnx_node, "epsilon", 1e-5))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
        return (y.astype(x.dtype),)


# Operators the float64 referee (onnx.reference) must compute as the standard says.
STANDARD_FIXES = [BatchNormalization]
