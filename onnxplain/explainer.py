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
from .errors import InputError, ModelError, OnnxplainError, OptionError, UnsupportedOperatorError
from .graph import Graph, read_model
from .methods.base import Context, get_method
from .runtime import Rows, Session
from .target import _Classes, _Predicted, as_target, resolve_target

LOOK_THROUGH = ("Softmax", "LogSoftmax")
# Operators whose result depends on the whole batch they run on (one quantization scale).
BATCH_STATISTICS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM")
# Operators that only move elements: a Softmax behind them still ends the model.
RELAYOUT = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


class Explainer:
    """Explains one ONNX model.

    model: a path, bytes or onnx.ModelProto. providers: onnxruntime execution providers
    (default: CUDA when it really works, else CPU). memory_budget: bytes that one batched
    run may use; multi-pass methods split their passes to stay under it. threads: intra-op
    threads of each onnxruntime session (default: ONNXPLAIN_THREADS, else onnxruntime's).
    """

    def __init__(self, model, providers=None, memory_budget: int | None = None, canonize: bool = True,
                 threads: int | None = None):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise OptionError(f"threads must be a positive integer, got {threads!r}")
        proto = read_model(model)
        self.source = proto
        model = _canonize.canonize(proto) if canonize else proto
        self._logits = _expose_logits(model)
        self.graph = Graph(model)
        self.providers = providers
        self.memory_budget = memory_budget
        self.threads = threads
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
        """The model's inputs from x, checked against the model: each in its own layout,
        batched along its batch axis (`Graph.input_batch_axes`); a single sample without
        its batch axis gets one; 0-d inputs stay 0-d."""
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
        axes, _static = self.graph.input_batch_axes()
        out = {}
        batch = None
        for n in names:
            a = np.asarray(feeds[n])
            want = self.graph.shape(n)
            ax = axes[n]
            dtype = _np_dtype(self.graph.elem_type(n))
            if a.dtype.kind not in "biuf":
                raise InputError(f"input '{n}' has dtype {a.dtype}; expected numbers of type {dtype}")
            if want is not None:
                if ax is not None and a.ndim == len(want) - 1:
                    a = np.expand_dims(a, ax)  # a single sample without its batch axis
                if a.ndim != len(want):
                    raise InputError(f"input '{n}' must have shape {_fmt(want)}, got {a.shape}")
                bad = [i for i, (d, s) in enumerate(zip(want, a.shape)) if i != ax and isinstance(d, int) and d != s]
                if bad:
                    raise InputError(f"input '{n}' must have shape {_fmt(want)}, got {a.shape}")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise InputError(f"input '{n}' contains NaN or Inf values")
            a = np.asarray(a, dtype=dtype, order="C")  # keeps a 0-d input 0-d
            if ax is not None:
                if a.ndim <= ax:
                    raise InputError(f"input '{n}' must have shape {_fmt(want)}, got {a.shape}")
                if batch is None:
                    batch = a.shape[ax]
                elif a.shape[ax] != batch:
                    raise InputError(f"inputs have different batch sizes ({batch} and {a.shape[ax]} in '{n}')")
            out[n] = a
        if batch == 0:
            raise InputError("the input batch is empty")
        return out

    def plan(self, feeds: dict) -> "Plan":
        """The layout of inputs shaped like `feeds` (see `Plan`), cached for the last few shapes."""
        axes, static = self.graph.input_batch_axes()
        key = tuple((k, _without(v.shape, axes[k])) for k, v in sorted(feeds.items()))
        key += tuple((k, v.dtype.str, v.tobytes()) for k, v in sorted(_baked(self.graph, feeds, axes).items()))
        whole = tuple((k, v.shape) for k, v in sorted(feeds.items())) + key
        if self._specialized.has(("whole",) + whole):
            return self._specialized.get(("whole",) + whole, None)
        plan = self._specialized.get(key, lambda: (Plan(self, feeds, axes, static), 1))
        if plan.n(feeds) > 1 and plan.declared_static is None and not plan.rows_independent(feeds):
            if any(n.op_type in BATCH_STATISTICS for n in self.graph.nodes):
                # Dynamic quantization takes one scale per run: the rows are still samples,
                # coupled only through that scale; the batch is explained as it runs.
                plan._independent = True
                return plan
            # What looked like a batch is a sequence the model runs through (a state carried
            # from row to row): the whole input is one sample.
            return self._specialized.get(("whole",) + whole,
                                         lambda: (Plan(self, feeds, {k: None for k in axes}, None,
                                                       whole=plan.n(feeds)), 1))
        return plan

    def _graph_for(self, feeds) -> Graph:
        """The model specialised to inputs shaped like `feeds`, the batch symbolic."""
        return self.plan(feeds).graph

    # ------------------------------------------------------------------ forward
    def _session(self, key, build) -> Session:
        def make():
            model = build()
            return Session(model, self.providers, self.memory_budget, self.threads), model.ByteSize()

        return self._cache.get(("session",) + key, make)

    def forward_session(self, feeds: dict, tensors) -> Rows:
        """The (cached) forward session that returns `tensors` for inputs shaped like `feeds`;
        its `run_rows` runs any number of batch-first rows under the memory budget."""
        plan = self.plan(feeds)
        return plan.forward(list(tensors), plan.fixed(feeds), plan.static_for(tensors))

    def _forward(self, feeds: dict, tensors) -> dict:
        """Values of any tensors of the model on `feeds`, batch first, under the memory budget."""
        tensors = list(tensors)
        plan = self.plan(feeds)
        static = plan.static_for(tensors)
        rows = plan.forward(tensors, plan.fixed(feeds), static)
        logical = plan.rows(feeds, static)
        parts = {t: [] for t in tensors}
        for _s, _e, out in rows.run_rows(plan.n(feeds), lambda s, e: {k: v[s:e] for k, v in logical.items()},
                                         tensors):
            for t in tensors:
                parts[t].append(out[t])
        return {t: np.concatenate(v) for t, v in parts.items()}

    def forward(self, x, tensors) -> dict:
        """Values of any named tensors of the model on x (as `attribute` takes it), batch first."""
        return self._forward(self._feeds(x), tensors)

    def feeds(self, x) -> dict:
        """x (an array, a list or a dict) as the model's checked inputs, name -> array."""
        return self._feeds(x)

    def shape(self, tensor: str, x) -> tuple | None:
        """A tensor's shape for inputs like x, as far as shape inference can tell (the batch
        axis symbolic)."""
        return self._graph_for(self._feeds(x)).shape(tensor)

    def predict(self, x, output=None) -> np.ndarray:
        """The model's output (the first one, or `output` by name or index) on x."""
        feeds = self._feeds(x)
        name = self._output_name(output)
        plan = self.plan(feeds)

        def as_given():
            # The model's answer as it gives it, in one run.
            return self._session(("predict", name) + plan.key, lambda: _with_outputs(plan.graph, [name])).run(
                feeds, [name])[name]

        if plan.axis(name) is None or plan.n(feeds) == 1:  # no axis provably the batch, or one run
            try:
                return as_given()
            except InputError:
                if plan.n(feeds) == 1:
                    raise
            # The model runs one sample at a time only: its answers, stacked per sample.
            return self._forward(feeds, [name])[name]
        try:
            return plan.physical(name, self._forward(feeds, [name])[name])
        except ModelError:
            # The axis read off the file did not hold on the run (an output called
            # 'batch_size' that counts frames): the model's answer as it gives it.
            return as_given()

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
        """The tensor a seed is applied to: the chosen output (by default the first float
        one: a classifier's scores, not its integer label; behind a ZipMap, the tensor it
        maps), or the logits before a terminal Softmax/LogSoftmax (the peers' convention)
        unless `probability`. The Softmax is found behind Identity and reshapes too, and in
        the Flatten -> Softmax -> Reshape form the opset converter writes."""
        g = self.graph
        if output is None:
            name = next((o for o in g.outputs if g.is_float(o)), None)
            if name is None:
                zipped = [g.producer[o] for o in g.outputs if o in g.producer and g.producer[o].op_type == "ZipMap"]
                name = zipped[0].input[0] if zipped else g.outputs[0]
        else:
            name = self._output_name(output)
            node = g.producer.get(name)
            if node is not None and node.op_type == "ZipMap":
                name = node.input[0]
        if probability:
            return name
        return self._logits.get(name) or _logits_behind(g, name)

    # ------------------------------------------------------------------ seeds
    def seed_for(self, feeds: dict, explained: str, target, keep: dict | None = None) -> np.ndarray:
        """The seed of `target` (any form of `onnxplain.target`) for the explained tensor,
        batch first as methods hold their rows; a float array target is given in the
        tensor's own layout (stacked per sample for a tensor without a batch axis). Only a
        predicted class runs the model (once); `keep` (a dict) then gets the explained
        tensor's values, batch first, under "values"."""
        t = as_target(target)
        plan = self.plan(feeds)
        shape = plan.graph.shape(explained)
        if plan.whole and isinstance(t, (_Classes, _Predicted)) and shape and shape[0] == plan.whole:
            # The model looked batched, but its rows are one sample (a sequence the model
            # runs through, a graph's nodes): a class per "sample" would silently explain
            # something else than the reader of the output expects.
            raise OptionError(
                f"the rows of the input are not separate samples for this model (they interact: a sequence, a "
                f"graph, a reduction over them), so target '{t.text}' has no per-sample meaning on "
                f"'{explained}'; give a seed array shaped like the output, or step:T / steps:T0-T1 for frames")
        logical = self._explained_shape(feeds, explained)
        b = self.plan(feeds).axis(explained) or 0
        physical = logical[1:b + 1] + logical[:1] + logical[b + 1:]
        out = None
        if t.needs_output(physical, b):
            first = self._forward(feeds, [explained])[explained]
            if keep is not None:
                keep["values"] = first
            out = np.moveaxis(first, 0, b)
        return np.ascontiguousarray(np.moveaxis(t.seed(physical, b, out), b, 0))

    def _explained_shape(self, feeds, explained) -> tuple:
        """The explained tensor's shape for this batch, batch first: along its batch axis,
        or, for a tensor without one (a Reshape that merged the batch), one whole tensor per
        sample as sample-by-sample runs give it. Static shapes spare a forward pass."""
        plan = self.plan(feeds)
        n = plan.n(feeds)
        plan.learn_axes(feeds, [explained])
        b = plan.axis(explained)
        if b is None:
            if plan.static_for([explained]) != 1:
                raise OptionError(
                    f"the explained tensor '{explained}' has shape {_fmt(plan.graph.shape(explained) or ())}: it is "
                    f"not the batch of {n} along any axis, and the model fixes its batch, so it cannot be read "
                    "sample by sample; explain an output (or layer) that keeps the batch axis"
                )
            shape = plan.static_graph(1).shape(explained)
            if shape is not None and all(isinstance(d, int) for d in shape):
                return (n,) + tuple(shape)
        else:
            shape = plan.graph.shape(explained)
            if shape is not None and len(shape) > b and all(isinstance(d, int) for i, d in enumerate(shape) if i != b):
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
                  probability: bool = False, wrt=None, **options):
        """Attribution of `method` for inputs x (array, or dict for multi-input models).

        target: class index per sample (int or sequence), None for the predicted class, or a
        float seed array shaped like the explained output. layer: a tensor name; the
        attribution is then at that tensor. wrt: the input(s) to attribute to (default: the
        batched float inputs, else the embedding output of a token model); the other inputs
        are held fixed. Returns an array shaped like the input (or the layer), or a dict when
        several tensors are attributed.
        """
        return self.attribute_scored(x, method, target, layer, output, probability, wrt, **options)[0]

    def attribute_scored(self, x, method: str = "gradient", target=None, layer=None, output=None,
                         probability: bool = False, wrt=None, **options):
        """(attribution, values) with `attribute`'s arguments: `values` is the explained
        tensor on x, batch first, when the method's own runs computed it (a single-pass
        explainer's forward half, or the forward pass that found the predicted class), else
        None. The dataset engine reads each input's predicted class and score from it
        instead of running the model once more."""
        m = get_method(method)
        opts = m.resolve(options)
        feeds = self._feeds(x)
        # A detection is decoded here (one forward pass) into the seed of its scores output.
        target, output = resolve_target(self, feeds, target, output)
        if layer is None and getattr(target, "chosen", None) and m.run.__module__.endswith(".cam"):
            from .detection import default_cam_layer

            layer = default_cam_layer(self, feeds, target)  # the feature map at the detection's scale
        explained = self.explained_tensor(output, probability)
        from .detection import check_selection

        check_selection(self.graph, explained, m.name)  # rows an in-graph NMS selects
        tensors = self.attributed(layer, wrt, feeds, black_box=m.kind == "black-box")
        # The predicted class (target None) is found lazily: a single-pass method forms it
        # inside its explainer, so the model runs once, not twice.
        seed = None if target is None else self.seed_for(feeds, explained, target)
        ctx = Context(self, feeds, seed, tensors, explained, method)
        result = {t: ctx.physical(t, a) for t, a in m.run(ctx, **opts).items()}
        values = ctx.values
        if values is not None and values.shape[:1] != (ctx.n,):
            values = None  # rows that are not the samples (a fixed batch run sample by sample)
        if len(result) == 1:
            return next(iter(result.values())), values
        return result, values

    def attributed(self, layer=None, wrt=None, feeds=None, black_box: bool = False) -> list[str]:
        """The tensors an attribution is for: `layer`, the inputs named by `wrt`, or by
        default the float inputs that carry the batch, else for a model whose inputs are
        token ids (or bytes) the embedding outputs -- or, for a black-box method, which
        perturbs inputs, those id inputs themselves."""
        names = set(self.graph.tensor_names())
        if layer is not None and wrt is not None:
            raise OptionError("give either layer= (a tensor inside the model) or wrt= (model inputs), not both")
        if layer is not None:
            if layer not in names:
                raise OptionError(f"unknown layer '{layer}'; `onnxplain inspect MODEL` lists the model's tensors")
            return [layer]
        if wrt is not None:
            chosen = [wrt] if isinstance(wrt, str) else list(wrt)
            bad = [w for w in chosen if w not in self.graph.inputs]
            if bad or not chosen:
                raise OptionError(f"wrt= names model inputs; unknown {bad or 'none given'}; "
                                  f"the model takes {', '.join(self.graph.inputs)} (use layer= for inner tensors)")
            ints = [w for w in chosen if not self.graph.is_float(w)]
            if ints and not black_box:
                raise OptionError(f"input(s) {', '.join(ints)} are not float: gradients cannot flow into them; "
                                  "attribute to the embedding output with layer=, or use a black-box method")
            return chosen
        axes, _ = self.graph.input_batch_axes()
        floats = self.float_inputs
        batched = [n for n in floats if axes[n] is not None]
        if batched or floats:
            return batched or floats
        if black_box:
            ids = [n for n in self.graph.inputs if axes[n] is not None]
            # Token models take masks and segment ids beside the ids: perturb what feeds
            # the embedding tables.
            indexed = [n for n in ids if any(node.op_type == "Gather" and n in node.input[1:]
                                            for node in self.graph.consumers.get(n, []))]
            if indexed or ids:
                return indexed or ids
        embeddings = _embeddings(self.graph)
        if embeddings:
            return embeddings
        raise OptionError("the model has no float inputs to attribute to; give a layer (e.g. the embedding output)")

    def _compiled(self, composite, wrt: tuple, explained: str, feeds: dict, method: str,
                  predicted_seed: bool = False, static: int | None = None):
        """The compiled explainer and its session, for inputs shaped like `feeds`."""
        return self.plan(feeds).compiled(composite, tuple(wrt), explained, method, predicted_seed, static)

    def _compiled_cut(self, composite, layer: str, explained: str, feeds: dict, method: str,
                      static: int | None = None):
        """An explainer of the model with `layer` cut out as an extra input: the layer's
        consumers read the fed value while every other path still sees the real inputs (as
        Captum's layer methods replace a module's output). Returns (spec, session, cut name)."""
        return self.plan(feeds).compiled_cut(composite, layer, explained, method, static)

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
        # What attribute() attributes to by default: the batched float inputs, else a token
        # model's embedding outputs (an explainer with no attribution output is refused).
        wrt = self.attributed(layer)
        acts = [t for t in wrt if t not in graph.inputs]
        spec = compile_explainer(graph, composite, wrt, explained, activations=acts, method=method,
                                 times_input=times_input)
        path = Path(path)
        try:
            onnx.save(spec.model, str(path))
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
        return spec


class Plan:
    """Inputs of one set of shapes: the model specialised to them, and where each tensor
    keeps its batch.

    In `graph` the batch is a symbol, so shape inference carries it to every tensor that
    has one (`Graph.batch_axis`): a sequence-first output keeps it on axis 1, a state input
    on its own axis. Sessions run batch-first rows through `runtime.Rows`. Where a tensor
    that is needed has no batch axis, the model fixes its batch size, or a rule needs every
    shape static, sessions run on `static_graph(rows)`: every dimension fixed, `rows`
    samples per run (the model's own batch size, else 1: sample by sample).
    """

    def __init__(self, explainer: "Explainer", feeds: dict, axes: dict, static: int | None, whole: int = 0):
        self.explainer = explainer
        # The input is one sample: its `whole` rows interact (see Explainer.plan).
        self.whole = whole
        self.input_axes = axes
        self.declared_static = static
        self.shapes = {k: v.shape for k, v in feeds.items()}
        self.baked = _baked(explainer.graph, feeds, axes)
        # Sessions are cached under this key: the shapes and the baked values.
        self.key = tuple((k, _without(v, axes[k])) for k, v in sorted(self.shapes.items())) + tuple(
            (k, v.dtype.str, v.tobytes()) for k, v in sorted(self.baked.items()))
        # Small unbatched inputs of a model with branches (a sample rate choosing a branch)
        # are constants of this plan (`baked`): the If they decide is inlined.
        self.graph = self._specialized(explainer.graph.specialize(self.shapes, axes))
        self._fix_others = True
        if _has_subgraphs(explainer.graph) and not _loads(self.graph.model):
            # A branch meant for other input sizes (silero's 8 kHz branch at 16 kHz) fails
            # onnxruntime's shape inference once every size is fixed: fix the batch only.
            self._fix_others = False
            self.graph = self._specialized(explainer.graph.specialize(self.shapes, axes, fix_others=False))
        self._static_graphs: dict[int, Graph] = {}
        self._probes = None
        self._independent = None
        self._runtime_axes: dict = {}
        self._guessed: set = set()  # axes read off declared names: checked by one run
        self._refuted: set = set()  # ... and found wrong
        # The batch's names in the model file, for outputs that inference cannot type
        # (operators of other domains) but the file declares.
        declared = {k: explainer.graph.shape(k) for k in axes}
        self._symbols = {declared[k][ax] for k, ax in axes.items()
                         if ax is not None and declared[k] and isinstance(declared[k][ax], str)}

    def _specialized(self, graph: Graph) -> Graph:
        """`graph` with the baked inputs as constants."""
        if not self.baked:
            return graph
        from onnx import numpy_helper

        from .canonize import fold_constants, inline_constant_ifs

        model = onnx.ModelProto()
        model.CopyFrom(graph.model)
        kept = [vi for vi in model.graph.input if vi.name not in self.baked]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in self.baked.items())
        # The branches those values choose are inlined, nested ones round by round: no If
        # of a constant condition is left for onnxruntime (folding one crashes 1.31 on
        # silero's), and the other branches, meant for other values, are gone.
        for _ in range(16):
            before = len(model.graph.node), sum(n.op_type == "If" for n in model.graph.node)
            model = inline_constant_ifs(fold_constants(model))
            if (len(model.graph.node), sum(n.op_type == "If" for n in model.graph.node)) == before:
                break
        return Graph(model, initializers={**graph.initializers, **self.baked})

    # --- layout -----------------------------------------------------------------------------
    def rows_independent(self, feeds: dict) -> bool:
        """Whether the first row's outputs are the same computed alone as in the batch (a
        model that carries a state along what looks like its batch axis fails this)."""
        if self._independent is None:
            outs = [o for o in self.graph.outputs if self.graph.is_float(o) and self.axis(o) is not None]
            if not outs:
                # No output keeps the batch to compare rows by: a row alone must at least be a
                # valid input (a graph's nodes one by one are not: edges point past them).
                floats = [o for o in self.graph.outputs if self.graph.is_float(o)]
                if not floats:
                    self._independent = True
                    return True
                # An output whose size does not grow with the rows reduced over them (a
                # Gemm with transA over the batch, graph pooling): rows are not samples.
                sizes = [[self._probed_size(o, i) for i in range(2)] for o in floats]
                if any(a is not None and a == b for a, b in sizes):
                    self._independent = False
                    return False
                try:
                    self.forward(floats, self.fixed(feeds), 1).run(
                        {k: v[:1] for k, v in self.rows(feeds, 1).items()}, floats)
                    self._independent = True
                except OnnxplainError:
                    self._independent = False
                return self._independent
            # Row 0 alone, and second behind row 1: three rows of work whatever the batch.
            rows = self.rows(feeds, None)
            session = self.forward(outs, self.fixed(feeds), None)
            try:
                alone = session.run({k: v[:1] for k, v in rows.items()}, outs)
                behind = session.run({k: v[[1, 0]] for k, v in rows.items()}, outs)
            except OnnxplainError:  # a row alone is not a valid input (a graph's nodes)
                self._independent = False
                return False
            self._independent = all(
                np.allclose(alone[o][0], behind[o][1], rtol=1e-4,
                            atol=1e-5 * (1 + (np.abs(alone[o][0]).max() if alone[o][0].size else 0)))
                for o in outs)
        return self._independent

    def n(self, feeds: dict) -> int:
        for k, ax in self.input_axes.items():
            if ax is not None and k in feeds:
                return feeds[k].shape[ax]
        return 1

    def learn_axes(self, feeds: dict, tensors) -> None:
        """For a model that fixes its batch size, tensors whose shape inference cannot
        tell (an ai.onnx.ml Normalizer's output) are run once: a first axis of the batch's
        size is their batch axis (and every later run checks it)."""
        tensors = [t for t in tensors if t not in self.input_axes and t not in self._runtime_axes]
        unknown = [t for t in tensors if self.declared_static is not None and self.axis(t) is None
                   and self.graph.shape(t) is None]
        # Axes read off the file's declared names alone are checked once too: a file may
        # call an axis 'batch_size' that counts frames.
        guessed = [t for t in tensors if self.axis(t) is not None and t in self._guessed]
        if not unknown and not guessed:
            return
        run = unknown + guessed
        out = self.explainer._session(("shapes", tuple(run)) + self.key,
                                      lambda: _with_outputs(self.graph, run)).run(feeds, run)
        n = self.n(feeds)
        for t in unknown:
            self._runtime_axes[t] = 0 if out[t].ndim and out[t].shape[0] == n else None
        for t in guessed:
            ax = self.axis(t)
            if out[t].ndim <= ax or out[t].shape[ax] != n:
                self._refuted.add(t)

    def axis(self, tensor: str) -> int | None:
        if tensor in self.input_axes:
            return self.input_axes[tensor]
        if self._runtime_axes.get(tensor) is not None:
            return self._runtime_axes[tensor]
        if tensor in self._refuted or self.graph.shape(tensor) == ():
            return None
        ax = self.graph.batch_axis(tensor)
        if ax is None:
            ax = self._probed_axis(tensor)
        if ax is None and self.declared_static is not None:
            # A model that fixes its batch size (and breaks at any other, so the probes
            # cannot tell): its first axis where it has that size, checked on every run.
            shape = self.graph.shape(tensor) or self.explainer.graph.shape(tensor)
            if shape and shape[0] == self.declared_static:
                return 0
        if ax is None and self._probes_say_unbatched(tensor):
            return None
        if ax is None and self.graph.shape(tensor) is None and tensor in self.graph.outputs:
            # Inference cannot type it (an operator of another domain): the file's declared
            # shape says, by the batch's name or a free first axis; every run checks it
            # (runtime.Rows), so a wrong reading fails loudly rather than mixing samples.
            declared = self.explainer.graph.shape(tensor) or ()
            hits = [i for i, d in enumerate(declared) if d in self._symbols]
            if not hits and declared and not isinstance(declared[0], int):
                hits = [0]
            ax = hits[0] if len(hits) == 1 else None
            if ax is not None:
                self._guessed.add(tensor)
        return ax

    PROBES = (7, 11)  # batch sizes unlikely to equal another dimension twice

    def _probes_say_unbatched(self, tensor: str) -> bool:
        """Whether static inference at both probe batch sizes gives the tensor one and the
        same static shape: then it does not carry the batch, whatever the file calls its
        axes (an output declared 'batch_size' that counts frames)."""
        self._probed_axis(tensor)  # runs the probes
        a, b = (p.get(tensor) for p in self._probes)
        return a is not None and a == b and all(isinstance(d, int) for d in a)

    def _probed_size(self, tensor: str, probe: int) -> int | None:
        """A tensor's number of elements at probe batch size PROBES[probe], if inference tells."""
        self._probed_axis(tensor)  # runs the probes
        shape = self._probes[probe].get(tensor)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return int(np.prod(shape))

    def _probed_axis(self, tensor: str) -> int | None:
        """Where the symbol is lost (a Reshape to (-1, C) has no symbolic answer), static
        inference at two batch sizes tells: the batch axis is the one axis whose size is the
        batch size in both."""
        if self._probes is None:
            try:
                self._probes = [self.explainer.graph.probe_shapes(self.shapes, self.input_axes, rows)
                                for rows in self.PROBES]
            except Exception:  # a model that fixes its batch somewhere: no proof
                self._probes = [{}, {}]
        a, b = (p.get(tensor) for p in self._probes)
        if a is None or b is None or len(a) != len(b):
            return None
        hits = [i for i, (da, db) in enumerate(zip(a, b)) if da == self.PROBES[0] and db == self.PROBES[1]]
        return hits[0] if len(hits) == 1 else None

    def static_for(self, tensors, static: int | None = None) -> int | None:
        """Rows per run when `tensors` must be read sample by sample (or the model fixes
        its batch), else None (any number of rows at once)."""
        if static is not None:
            return static
        if self.declared_static is not None:
            return self.declared_static
        return 1 if any(self.axis(t) is None for t in tensors) else None

    def fixed(self, feeds: dict, rows=()) -> dict:
        """The inputs fed as they are: those without a batch axis, unless fed as rows."""
        return {k: v for k, v in feeds.items() if self.input_axes.get(k) is None and k not in rows}

    def rows(self, feeds: dict, static: int | None, extra=()) -> dict:
        """Batch-first rows of the batched inputs (and of `extra` unbatched inputs, one row
        per sample, which needs runs of one row)."""
        n = self.n(feeds)
        out = {}
        for k, v in feeds.items():
            ax = self.input_axes.get(k)
            if ax is not None:
                out[k] = np.moveaxis(v, ax, 0) if ax else v
            elif k in extra:
                if static != 1:
                    raise ModelError(f"input '{k}' has no batch axis; it can be attributed only sample by sample")
                out[k] = np.broadcast_to(v[None], (n,) + v.shape)
        return out

    def physical(self, tensor: str, a: np.ndarray) -> np.ndarray:
        """A batch-first array back in the tensor's own layout (an attribution has its
        tensor's shape). A tensor without a batch axis gives one array per sample: stacked,
        or the tensor's own shape for one sample."""
        ax = self.axis(tensor)
        if ax is None:
            return a[0] if a.shape[0] == 1 else a
        return np.moveaxis(a, 0, ax) if ax else a

    def axes_for(self, names: dict) -> dict:
        """Batch axes by fed/read name: {name: tensor it carries}."""
        return {name: self.axis(t) for name, t in names.items()}

    def static_graph(self, rows: int) -> Graph:
        if rows not in self._static_graphs:
            shapes = {}
            for k, shape in self.shapes.items():
                ax = self.input_axes[k]
                shapes[k] = shape if ax is None else shape[:ax] + (rows,) + shape[ax + 1:]
            self._static_graphs[rows] = self._specialized(self.explainer.graph.specialize(
                shapes, self.input_axes, static=True, fix_others=self._fix_others))
        return self._static_graphs[rows]

    def graph_for(self, static: int | None) -> Graph:
        return self.graph if static is None else self.static_graph(static)

    # --- sessions ---------------------------------------------------------------------------
    def forward(self, tensors: list, fixed: dict, static: int | None) -> Rows:
        e = self.explainer
        graph = self.graph_for(static)
        key = ("forward", tuple(tensors), static) + self.key
        session = e._session(key, lambda: _with_outputs(graph, tensors))
        names = {**{k: k for k in self.shapes}, **{t: t for t in tensors}}
        return Rows(session, self.axes_for(names), fixed, static, ranks={t: r for t in tensors
                                                                        if (r := self.rank(t)) is not None})

    def rank(self, tensor: str) -> int | None:
        """A tensor's rank for these inputs, from inference or the probes."""
        shape = self.graph.shape(tensor)
        if shape is None and self._probes is not None:
            shape = self._probes[0].get(tensor)
        return None if shape is None else len(shape)

    def compiled(self, composite, wrt: tuple, explained: str, method: str, predicted_seed: bool = False,
                 static: int | None = None):
        """(spec, session) of the explainer; on a graph whose batch is symbolic unless
        `static`, and on the static graph where a rule needs every shape known."""
        e = self.explainer
        key = (composite.key(), wrt, explained, self.key, predicted_seed, static)

        def make():
            def build(graph):
                acts = [t for t in wrt if t not in graph.inputs]
                return compile_explainer(graph, composite, list(wrt), explained, activations=acts, method=method,
                                         predicted_seed=predicted_seed, values=True)
            try:
                spec = build(self.graph_for(static))
            except UnsupportedOperatorError:
                raise
            except ModelError:
                if static is not None:
                    raise
                # A rule that needs static shapes (a Resize sized at run time from the
                # batch, ...): with every dimension fixed, constant folding settles them.
                spec = build(self.static_graph(1))
                spec.static = 1
            return (spec, Session(spec.model, e.providers, e.memory_budget, e.threads)), 2 * spec.model.ByteSize()

        return e._cache.get(key, make)

    def compiled_cut(self, composite, layer: str, explained: str, method: str, static: int | None = None):
        e = self.explainer
        graph = self.graph_for(static)
        cut = f"{layer}/onnxplain.cut"
        key = ("cut", composite.key(), layer, explained, self.key, static)

        def make():
            cut_graph = Graph(_cut_model(graph, layer, cut))
            spec = compile_explainer(cut_graph, composite, [cut], explained, method=method)
            return (spec, Session(spec.model, e.providers, e.memory_budget, e.threads)), 2 * spec.model.ByteSize()

        spec, session = e._cache.get(key, make)
        return spec, session, cut


def _softmax_chain(producers: dict, consumers: dict, name: str):
    """(Softmax node, re-layout nodes after it) when `name` is a Softmax/LogSoftmax seen
    through Identity and reshapes, else None."""
    chain, t = [], name
    while True:
        node = producers.get(t)
        if node is None:
            return None
        if node.op_type in LOOK_THROUGH:
            return node, chain
        if node.op_type not in RELAYOUT or consumers.get(node.input[0], 0) != 1:
            return None
        chain.append(node)
        t = node.input[0]


def _logits_behind(graph, name: str) -> str:
    """The tensor before a terminal Softmax/LogSoftmax seen through Identity and reshapes;
    `name` itself when there is none."""
    found = _softmax_chain(graph.producer, {k: len(v) for k, v in graph.consumers.items()}, name)
    return name if found is None else found[0].input[0]


def _expose_logits(model: onnx.ModelProto) -> dict:
    """For each output that is a Softmax reshaped (the opset converter's Flatten -> Softmax
    -> Reshape, paddle2onnx's Softmax -> Reshape), add the logits in the output's own shape
    (Reshape(logits, Shape(output))) so a seed shaped like the output explains the logits.
    Outputs are unchanged. Returns {output: tensor of its logits}."""
    from onnx import helper

    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    exposed = {}
    for out in g.output:
        found = _softmax_chain(producers, consumers, out.name)
        if found is None or not any(n.op_type != "Identity" for n in found[1]):
            continue
        logits = found[0].input[0]
        shape, name = f"{out.name}/onnxplain.shape", f"{out.name}/onnxplain.logits"
        g.node.extend([helper.make_node("Shape", [out.name], [shape], name=shape),
                       helper.make_node("Reshape", [logits, shape], [name], name=name)])
        exposed[out.name] = name
    return exposed


def _baked(graph, feeds: dict, axes: dict) -> dict:
    """The unbatched inputs of at most 16 values of a model with If nodes: they usually
    choose a branch (a sample rate) and are constants of the plan for their values."""
    if not any(n.op_type == "If" for n in graph.nodes):
        return {}
    return {k: np.asarray(v) for k, v in feeds.items() if axes.get(k) is None and np.size(v) <= 16}


def _has_subgraphs(graph) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in graph.nodes for a in n.attribute)


def _loads(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime accepts the model (its shape inference is stricter than onnx's)."""
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 4
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return True
    except Exception:
        return False


def _without(shape, axis):
    return tuple(shape) if axis is None else tuple(shape[:axis]) + tuple(shape[axis + 1:])


def _embeddings(graph) -> list[str]:
    from . import graph as _graph

    find = getattr(_graph, "find_embeddings", None)
    return list(find(graph)) if find else []


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

    def has(self, key) -> bool:
        return key in self._items

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
    from .canonize import _rename_inputs

    m = onnx.ModelProto()
    m.CopyFrom(graph.model)
    _rename_inputs(m.graph, {layer: cut})  # readers inside If/Loop/Scan bodies too
    for o in m.graph.output:
        if o.name == layer:
            raise OptionError(f"layer '{layer}' is a model output; choose a tensor inside the model")
    dims = ["N" if i == 0 and d is None else d for i, d in enumerate(shape)]
    m.graph.input.append(helper.make_tensor_value_info(cut, graph.elem_type(layer) or onnx.TensorProto.FLOAT, dims))
    return m


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
