"""The Python API: `Explainer(model).attribute(x, method=..., target=..., layer=..., **options)`."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx

from . import canonize as _canonize
from . import methods as _methods  # noqa: F401  (registers the methods)
from .compile import META_KEY, compile_explainer
from .errors import InputError, ModelError, OptionError
from .graph import Graph, read_model
from .methods.base import Context, get_method
from .runtime import Session
from .target import as_target, batch_axis as target_batch_axis

LOOK_THROUGH = ("Softmax", "LogSoftmax")


class Explainer:
    """Explains one ONNX model.

    model: a path, bytes or onnx.ModelProto. providers: onnxruntime execution providers
    (default: CUDA when it really works, else CPU). memory_budget: bytes that one batched
    run may use; multi-pass methods split their passes to stay under it.
    """

    def __init__(self, model, providers=None, memory_budget: int | None = None, canonize: bool = True):
        proto = read_model(model)
        self.source = proto
        self.graph = Graph(_canonize.canonize(proto) if canonize else proto)
        self.providers = providers
        self.memory_budget = memory_budget
        # Sessions and compiled explainers are cached per method and input shape, least
        # recently used first out once they hold more model bytes than the cache allows:
        # each holds a copy of the weights (half a GB for a VGG-16).
        self._cache = _Cache()
        # The model specialised to each input shape (a proto with its own copy of the
        # weights): the few most recent shapes, for inputs whose length varies (text).
        self._specialized = _Cache(limit=SPECIALIZED_SHAPES)
        self.metadata = {p.key: p.value for p in proto.metadata_props}

    # ------------------------------------------------------------------ model facts
    @property
    def inputs(self) -> dict:
        return self.graph.input_shapes()

    @property
    def outputs(self) -> list[str]:
        return list(self.graph.outputs)

    @property
    def float_inputs(self) -> list[str]:
        return [n for n in self.graph.inputs if self.graph.is_float(n)]

    def preprocess_metadata(self) -> dict | None:
        raw = self.metadata.get("onnxplain.preprocess")
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    # ------------------------------------------------------------------ inputs
    def _feeds(self, x) -> dict:
        names = self.graph.inputs
        if isinstance(x, dict):
            feeds = dict(x)
        elif isinstance(x, (list, tuple)) and len(names) > 1 and len(x) == len(names):
            feeds = dict(zip(names, x))
        else:
            if len(names) != 1:
                raise InputError(f"the model has {len(names)} inputs ({', '.join(names)}); pass a dict name -> array")
            feeds = {names[0]: x}
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise InputError(
                f"inputs do not match the model: missing {missing or 'none'}, unknown {extra or 'none'}; "
                f"the model takes {', '.join(names)}"
            )
        out = {}
        batch = None
        for n in names:
            a = np.asarray(feeds[n])
            want = self.graph.shape(n)
            dtype = _np_dtype(self.graph.elem_type(n))
            if a.dtype.kind not in "biuf":
                raise InputError(f"input '{n}' has dtype {a.dtype}; expected numbers of type {dtype}")
            if want is not None:
                if a.ndim == len(want) - 1:
                    a = a[None]  # a single sample without its batch axis
                if a.ndim != len(want):
                    raise InputError(f"input '{n}' must have shape {_fmt(want)}, got {a.shape}")
                bad = [i for i, (d, s) in enumerate(zip(want, a.shape)) if i > 0 and isinstance(d, int) and d != s]
                if bad:
                    raise InputError(f"input '{n}' must have shape {_fmt(want)}, got {a.shape}")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise InputError(f"input '{n}' contains NaN or Inf values")
            a = np.ascontiguousarray(a, dtype=dtype)
            if batch is None:
                batch = a.shape[0]
            elif a.shape[0] != batch:
                raise InputError(f"inputs have different batch sizes ({batch} and {a.shape[0]})")
            out[n] = a
        if batch == 0:
            raise InputError("the input batch is empty")
        return out

    def _graph_for(self, feeds) -> Graph:
        key = tuple((k, v.shape[1:]) for k, v in sorted(feeds.items()))
        return self._specialized.get(key, lambda: (self.graph.specialize({k: v.shape for k, v in feeds.items()}), 1))

    # ------------------------------------------------------------------ forward
    def _session(self, key, build) -> Session:
        def make():
            model = build()
            return Session(model, self.providers, self.memory_budget), model.ByteSize()

        return self._cache.get(("session",) + key, make)

    def forward_session(self, feeds: dict, tensors) -> Session:
        """The (cached) forward session that returns `tensors` for inputs shaped like `feeds`;
        its `run_rows` runs any number of rows under the memory budget."""
        tensors = list(tensors)
        graph = self._graph_for(feeds)
        key = ("forward", tuple(tensors)) + tuple((k, v.shape[1:]) for k, v in sorted(feeds.items()))
        return self._session(key, lambda: _with_outputs(graph, tensors))

    def _forward(self, feeds: dict, tensors) -> dict:
        """Values of any tensors of the model on `feeds`, batched under the memory budget."""
        tensors = list(tensors)
        sess = self.forward_session(feeds, tensors)
        n = next(iter(feeds.values())).shape[0]
        parts = {t: [] for t in tensors}
        for _s, _e, out in sess.run_rows(n, lambda s, e: {k: v[s:e] for k, v in feeds.items()}, tensors):
            for t in tensors:
                parts[t].append(out[t])
        return {t: np.concatenate(v) for t, v in parts.items()}

    def predict(self, x, output=None) -> np.ndarray:
        """The model's output (the first one, or `output` by name or index) on x."""
        feeds = self._feeds(x)
        name = self._output_name(output)
        return self._forward(feeds, [name])[name]

    def _output_name(self, output) -> str:
        outs = self.graph.outputs
        if output is None:
            return outs[0]
        if isinstance(output, (int, np.integer)) and not isinstance(output, bool):
            if not 0 <= output < len(outs):
                raise OptionError(f"output index {output} out of range; the model has {len(outs)} output(s)")
            return outs[int(output)]
        if output not in outs:
            if output in set(self.graph.tensor_names()):
                return output
            raise OptionError(f"unknown output '{output}'; the model's outputs: {', '.join(outs)}")
        return output

    def explained_tensor(self, output=None, probability: bool = False) -> str:
        """The tensor a seed is applied to: the chosen output, or the logits before a
        terminal Softmax/LogSoftmax (the peers' convention) unless `probability`."""
        name = self._output_name(output)
        if probability:
            return name
        node = self.graph.producer.get(name)
        if node is not None and node.op_type in LOOK_THROUGH:
            return node.input[0]
        return name

    # ------------------------------------------------------------------ seeds
    def seed_for(self, feeds: dict, explained: str, target) -> np.ndarray:
        """The seed of `target` (any form of `onnxplain.target`) for the explained tensor,
        batch first as methods hold their rows; a float array target is given in the
        tensor's own layout. Only a predicted class runs the model (once)."""
        t = as_target(target)
        logical = self._explained_shape(feeds, explained)
        b = min(target_batch_axis(self._graph_for(feeds), explained), len(logical) - 1)
        physical = logical[1:b + 1] + logical[:1] + logical[b + 1:]
        out = None
        if t.needs_output(physical, b):
            out = np.moveaxis(self._forward(feeds, [explained])[explained], 0, b)
        return np.ascontiguousarray(np.moveaxis(t.seed(physical, b, out), b, 0))

    def _explained_shape(self, feeds, explained) -> tuple:
        """The explained tensor's shape for this batch, batch first (its batch axis is the
        one shape inference carried the batch to); static shapes spare a forward pass."""
        plan = getattr(self, "plan", None)
        n = plan(feeds).n(feeds) if plan is not None else next(iter(feeds.values())).shape[0]
        graph = self._graph_for(feeds)
        shape = graph.shape(explained)
        b = target_batch_axis(graph, explained)
        if shape is not None and len(shape) > b and all(isinstance(d, int) for i, d in enumerate(shape) if i != b):
            if isinstance(shape[b], int) and shape[b] != n:
                raise OptionError(
                    f"the explained tensor '{explained}' has shape {_fmt(shape)}: its axis {b} is not the batch of "
                    f"{n} and no other axis provably is; explain an output (or layer) that keeps the batch axis"
                )
            return (n,) + tuple(shape[:b]) + tuple(shape[b + 1:])
        out_shape = self._forward(feeds, [explained])[explained].shape
        if not out_shape or out_shape[0] != n:
            raise OptionError(
                f"the explained tensor '{explained}' has shape {out_shape} for a batch of {n}: its axis is not "
                "the batch and no other axis provably is; explain an output (or layer) that keeps the batch axis"
            )
        return tuple(out_shape)

    # ------------------------------------------------------------------ attribution
    def attribute(self, x, method: str = "gradient", target=None, layer=None, output=None,
                  probability: bool = False, **options):
        """Attribution of `method` for inputs x (array, or dict for multi-input models).

        target: class index per sample (int or sequence), None for the predicted class, or a
        float seed array shaped like the explained output. layer: a tensor name; the
        attribution is then at that tensor. Returns an array shaped like the input (or the
        layer), or a dict when the model has several float inputs.
        """
        m = get_method(method)
        opts = m.resolve(options)
        feeds = self._feeds(x)
        explained = self.explained_tensor(output, probability)
        if layer is not None:
            if layer not in set(self.graph.tensor_names()):
                raise OptionError(f"unknown layer '{layer}'; `onnxplain inspect MODEL` lists the model's tensors")
            wrt = [layer]
        else:
            wrt = self.float_inputs
            if not wrt:
                raise OptionError("the model has no float inputs to attribute to; give a layer (e.g. the embedding output)")
        # The predicted class (target None) is found lazily: a single-pass method forms it
        # inside its explainer, so the model runs once, not twice.
        seed = None if target is None else self.seed_for(feeds, explained, target)
        ctx = Context(self, feeds, seed, wrt, explained, method)
        result = m.run(ctx, **opts)
        if len(result) == 1:
            return next(iter(result.values()))
        return result

    def _compiled(self, composite, wrt: tuple, explained: str, feeds: dict, method: str,
                  predicted_seed: bool = False):
        graph = self._graph_for(feeds)
        key = (composite.key(), wrt, explained, tuple((k, v.shape[1:]) for k, v in sorted(feeds.items())),
               predicted_seed)

        def make():
            acts = [t for t in wrt if t not in graph.inputs]
            spec = compile_explainer(graph, composite, list(wrt), explained, activations=acts, method=method,
                                     predicted_seed=predicted_seed)
            return (spec, Session(spec.model, self.providers, self.memory_budget)), 2 * spec.model.ByteSize()

        return self._cache.get(key, make)

    def _compiled_cut(self, composite, layer: str, explained: str, feeds: dict, method: str):
        """An explainer of the model with `layer` cut out as an extra input: the layer's
        consumers read the fed value while every other path still sees the real inputs (as
        Captum's layer methods replace a module's output). Returns (spec, session, cut name)."""
        graph = self._graph_for(feeds)
        cut = f"{layer}/onnxplain.cut"
        key = ("cut", composite.key(), layer, explained, tuple((k, v.shape[1:]) for k, v in sorted(feeds.items())))

        def make():
            cut_graph = Graph(_cut_model(graph, layer, cut))
            spec = compile_explainer(cut_graph, composite, [cut], explained, method=method)
            return (spec, Session(spec.model, self.providers, self.memory_budget)), 2 * spec.model.ByteSize()

        spec, session = self._cache.get(key, make)
        return spec, session, cut

    # ------------------------------------------------------------------ export
    def export(self, path, method: str = "gradient", layer=None, output=None, probability: bool = False,
               input_shape=None, **options):
        """Save the explainer model of a single-pass method with its options (an LRP
        composite's epsilon, a user composite's rules, ...): feed the model's inputs and a
        seed named 'onnxplain.seed'; read the attribution outputs named in its metadata."""
        from .methods import exportable

        composite, times_input = exportable(method, options)
        explained = self.explained_tensor(output, probability)
        graph = self.graph if input_shape is None else self.graph.specialize(
            {self.graph.inputs[0]: tuple(input_shape)})
        wrt = [layer] if layer else self.float_inputs
        acts = [t for t in wrt if t not in graph.inputs]
        spec = compile_explainer(graph, composite, wrt, explained, activations=acts, method=method,
                                 times_input=times_input)
        path = Path(path)
        try:
            onnx.save(spec.model, str(path))
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
        return spec


CACHE_BYTES = 2 * 1024**3  # model bytes of cached sessions; ONNXPLAIN_CACHE_BYTES overrides
SPECIALIZED_SHAPES = 4  # input shapes whose specialised model graph is kept


class _Cache:
    """Least-recently-used cache bounded by the sum of its entries' sizes (model bytes for
    sessions; 1 each to bound a count). The newest entry always stays, so one method on a
    model larger than the bound still works."""

    def __init__(self, limit: int | None = None):
        self.limit = limit if limit is not None else int(os.environ.get("ONNXPLAIN_CACHE_BYTES", CACHE_BYTES))
        self._items: OrderedDict = OrderedDict()

    def __len__(self):
        return len(self._items)

    def values(self):
        return [v for v, _ in self._items.values()]

    def get(self, key, make):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        value, nbytes = make()
        self._items[key] = (value, nbytes)
        dropped = False
        while len(self._items) > 1 and sum(n for _, n in self._items.values()) > self.limit:
            self._items.popitem(last=False)
            dropped = True
        if dropped:
            _return_freed_memory()
        return value


def _return_freed_memory():
    """Hand the heap freed by a dropped session back to the system (glibc keeps it
    otherwise: several GB after a few methods on a VGG-16)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _with_outputs(graph: Graph, tensors) -> onnx.ModelProto:
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(graph.model)
    existing = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in existing:
            m.graph.output.append(helper.make_tensor_value_info(t, graph.elem_type(t) or onnx.TensorProto.FLOAT, None))
    return m


def _cut_model(graph: Graph, layer: str, cut: str) -> onnx.ModelProto:
    from onnx import helper

    if layer in graph.inputs:
        raise OptionError(f"'{layer}' is a model input, not a layer inside it")
    shape = graph.shape(layer)
    if shape is None:
        raise ModelError(f"the shape of layer '{layer}' is unknown; give the model static shapes")
    m = onnx.ModelProto()
    m.CopyFrom(graph.model)
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name == layer:
                node.input[i] = cut
    for o in m.graph.output:
        if o.name == layer:
            raise OptionError(f"layer '{layer}' is a model output; choose a tensor inside the model")
    dims = ["N" if i == 0 and d is None else d for i, d in enumerate(shape)]
    m.graph.input.append(helper.make_tensor_value_info(cut, graph.elem_type(layer) or onnx.TensorProto.FLOAT, dims))
    return m


def _targets(target, out, n) -> list:
    """The class explained per sample (batch-first output values `out`), for the forms
    that are one class per sample; the other forms have no class to name."""
    t = as_target(target)
    classes = t.classes(out.shape, out)
    if classes is None:
        raise OptionError(f"target '{t.text}' is not one class per sample")
    return [int(c) for c in np.broadcast_to(classes, (n,))]


def _np_dtype(elem):
    from onnx import helper

    if not elem:
        return np.float32
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"


def explainer_metadata(model: onnx.ModelProto) -> dict:
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    raise ModelError("this model is not an onnxplain explainer (no metadata)")
