"""Method registry, option specifications, and the context methods run in.

A method is a function `run(ctx, **options) -> dict[tensor name -> attribution]`
registered under a stable name with its options and defaults. The same spelling works
from Python (`attribute(x, method=..., n_steps=50)`), from the CLI
(`--option n_steps=50`) and in an exported explainer's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import InputError, OptionError
from ..runtime import Rows

# ----------------------------------------------------------------------------- options


def _parse_bool(s):
    if isinstance(s, bool):
        return s
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"'{s}' is not a boolean (true/false)")


def _parse_ints(s):
    if isinstance(s, (list, tuple)):
        return tuple(int(v) for v in s)
    if isinstance(s, (int, np.integer)):
        return (int(s),)
    return tuple(int(v) for v in str(s).replace("(", "").replace(")", "").split(",") if v.strip())


def _parse_array_or_float(s):
    """A scalar, a comma list, an array, or a path to .npy (CLI)."""
    if isinstance(s, np.ndarray):
        return s
    if isinstance(s, (int, float, np.floating, np.integer)):
        return float(s)
    if isinstance(s, (list, tuple)):
        return np.asarray(s, dtype=np.float32)
    text = str(s).strip()
    if text.endswith(".npy"):
        from ..io import load_array

        return load_array(text)
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) == 1:
        return float(parts[0])
    return np.asarray([float(p) for p in parts], dtype=np.float32)


PARSERS = {
    int: lambda s: int(s) if not isinstance(s, bool) else int(s),
    float: float,
    str: str,
    bool: _parse_bool,
    "ints": _parse_ints,
    "array": _parse_array_or_float,
    "any": lambda s: s,
}


@dataclass
class Option:
    name: str
    default: Any
    kind: Any  # int, float, str, bool, "ints", "array", "any"
    help: str
    choices: tuple | None = None
    check: Callable | None = None  # value -> error message or None

    def parse(self, value, method: str):
        if value is None and self.default is None:
            return None
        try:
            v = PARSERS[self.kind](value)
        except (ValueError, TypeError) as exc:
            raise OptionError(f"option {self.name}={value!r} of method '{method}': {exc}") from None
        if self.choices and v not in self.choices:
            raise OptionError(
                f"option {self.name}={v!r} of method '{method}' must be one of: {', '.join(map(str, self.choices))}"
            )
        if self.check:
            msg = self.check(v)
            if msg:
                raise OptionError(f"option {self.name}={v!r} of method '{method}': {msg}")
        return v


def positive(v):
    return None if v > 0 else "must be positive"


def non_negative(v):
    return None if v >= 0 else "must not be negative"


@dataclass
class Method:
    name: str
    run: Callable
    description: str
    options: dict = field(default_factory=dict)
    reference: str = ""
    kind: str = "white-box"  # or "black-box"
    # A single-pass method's composite from its resolved options: the method is then one
    # explainer run and can be exported as a standalone graph. `times_input`: its result is
    # that run's attribution times the attributed tensor (input x gradient).
    composite: Callable | None = None
    times_input: bool = False

    def resolve(self, given: dict) -> dict:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise OptionError(f"method '{self.name}' has no option(s) {', '.join(unknown)}; its options: {valid}")
        out = {}
        for name, opt in self.options.items():
            out[name] = opt.parse(given[name], self.name) if name in given else opt.default
        return out


METHODS: dict[str, Method] = {}


def register(name: str, description: str, options=(), reference: str = "", kind: str = "white-box",
             composite: Callable | None = None, times_input: bool = False):
    def deco(fn):
        METHODS[name] = Method(name, fn, description, {o.name: o for o in options}, reference, kind, composite,
                               times_input)
        return fn

    return deco


def _spelling(name: str) -> str:
    """A method name with case and separators folded: Integrated-Gradients, lrp-epsilon."""
    return "".join("_" if c in "-_. " else c for c in str(name).strip().lower())


def _initials(name: str) -> str:
    return "".join(w[0] for w in _spelling(name).split("_") if w)


def get_method(name: str) -> Method:
    """The method of a name, as registered or with case and separators (- _ . space)
    folded where that names exactly one method; otherwise an OptionError suggesting the
    closest names (difflib, and methods whose initials the name spells: IG)."""
    if name in METHODS:
        return METHODS[name]
    key = _spelling(name)
    same = [m for m in METHODS if _spelling(m) == key]
    if len(same) == 1:
        return METHODS[same[0]]
    import difflib

    by_key = {}
    for m in METHODS:
        by_key.setdefault(_spelling(m), []).append(m)
    close = list(same)
    close += [m for m in METHODS if len(key) >= 2 and _initials(m) == key.replace("_", "")]
    close += [m for k in difflib.get_close_matches(key, list(by_key), n=5, cutoff=0.6) for m in by_key[k]]
    close += [m for m in METHODS if len(key) >= 3 and (key in _spelling(m) or _spelling(m) in key)]
    close = list(dict.fromkeys(close))
    hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
    raise OptionError(f"unknown method '{name}'{hint}; `onnxplain methods` lists them")


# ----------------------------------------------------------------------------- context


class Context:
    """What a method sees, and its one way into the engine: the inputs as batch-first rows,
    the explained tensor and its seed, and runs of the forward model and of explainers.

    `wrt` are the tensors attributions are asked for: the model's float inputs, or the
    layer tensor. Whatever the model's layout (a batch on another axis, on none, a fixed
    batch size), `feeds`, `seed`, attributions and activations are batch first; inputs
    without a batch axis are held fixed (`fixed`). `backward` runs a compiled explainer for
    any number of rows, chunked under the memory budget.
    """

    def __init__(self, explainer, feeds: dict, seed: np.ndarray, wrt: list, explained: str, method: str,
                 _from=None):
        self.explainer = explainer
        self.wrt = list(wrt)
        self.explained = explained
        self.method = method
        if _from is not None:  # the same inputs, other tensors attributed (see `with_wrt`)
            self.plan, self.static, self.fixed = _from.plan, _from.static, _from.fixed
            self.feeds, self.n, self._seed = _from.feeds, _from.n, _from._seed
            self._values = _from._values
            return
        self.plan = explainer.plan(feeds)
        self.plan.learn_axes(feeds, [explained] + [t for t in self.wrt if t not in feeds])
        # Unbatched inputs attributed to (a 0-d input, a fixed state) become rows of their own.
        extra = [t for t in self.wrt if t in feeds and self.plan.input_axes.get(t) is None]
        self.static = self.plan.static_for([explained] + self.wrt, 1 if extra else None)
        self.fixed = self.plan.fixed(feeds, rows=extra)
        self.feeds = self.plan.rows(feeds, self.static, extra)
        self.n = self.plan.n(feeds)
        self._seed = seed  # batch first, as Explainer.seed_for makes it
        self._values = None  # the explained tensor's values on these inputs, once a run computed them

    def with_wrt(self, wrt) -> "Context":
        """This context with other tensors attributed (a layer of a CAM, the inputs)."""
        return Context(self.explainer, None, None, wrt, self.explained, self.method, _from=self)

    # --- layout ---------------------------------------------------------------------------
    @property
    def graph(self):
        """The model specialised to these inputs (batch symbolic)."""
        return self.plan.graph

    def shape(self, tensor: str) -> tuple | None:
        """A tensor's shape for these inputs, batch first: (n, ...)."""
        shape = self.plan.graph.shape(tensor)
        if shape is None:
            return None
        ax = self.plan.axis(tensor)
        rest = shape if ax is None else shape[:ax] + shape[ax + 1:]
        return (self.n,) + tuple(rest)

    def physical(self, tensor: str, a: np.ndarray) -> np.ndarray:
        """A batch-first array in the tensor's own layout."""
        return self.plan.physical(tensor, a)

    def _rows(self, session, names: dict, static=None):
        """A session fed and read batch first; `names`: fed/read name -> tensor it carries."""
        if isinstance(session, Rows):
            return session
        names = {**{k: k for k in self.plan.input_axes}, **names}
        return Rows(session, self.plan.axes_for(names), self.fixed, static if static is not None else self.static)

    def _explainer_rows(self, spec, session, cut: dict | None = None):
        cut = cut or {}  # a cut-out layer fed by name: it carries the layer's layout
        names = {spec.attributions[t]: cut.get(t, t) for t in spec.attributions}
        names.update({spec.activations[t]: cut.get(t, t) for t in spec.activations})
        names.update(cut)
        if spec.seed is not None:
            names[spec.seed] = self.explained
        if getattr(spec, "values", None):
            names[spec.values] = self.explained
        axes = self.plan.axes_for(names)
        if spec.predicted:
            axes[spec.predicted] = 0
        axes.update({k: self.plan.axis(k) for k in self.plan.input_axes})
        static = getattr(spec, "static", None) or self.static
        ranks = {}
        if spec.seed is not None:  # the rank the explainer declares for its seed
            seed_vi = next((vi for vi in spec.model.graph.input if vi.name == spec.seed), None)
            if seed_vi is not None and seed_vi.type.tensor_type.HasField("shape"):
                ranks[spec.seed] = len(seed_vi.type.tensor_type.shape.dim)
        return Rows(session, axes, self.fixed, static, ranks=ranks)

    # --- seeds ----------------------------------------------------------------------------
    @property
    def seed(self) -> np.ndarray:
        """The seed of the explained tensor. Explaining the predicted class, it comes from
        the first backward pass (which forms it in the graph) or else from a forward pass."""
        if self._seed is None:
            kept = {}
            self._seed = self.explainer.seed_for(self._physical_feeds(), self.explained, None, keep=kept)
            if kept.get("values") is not None:
                self.values = kept["values"]
        return self._seed

    @property
    def values(self) -> np.ndarray | None:
        """The explained tensor's values on these inputs (batch first) if a run already
        computed them (a single-pass explainer, the forward pass that found the predicted
        class), else None: a caller wanting scores runs no second forward pass."""
        return self._values

    @values.setter
    def values(self, values: np.ndarray) -> None:
        """Values of the explained tensor a method computed on these very inputs."""
        if self._values is None:
            self._values = values

    def _physical_feeds(self) -> dict:
        feeds = {k: self.plan.physical(k, v) if self.plan.input_axes.get(k) is not None else v[0]
                 for k, v in self.feeds.items()}
        return {**feeds, **self.fixed}

    def _seed_in_graph(self) -> bool:
        """Whether the predicted class can be formed inside the explainer: the seed is not
        known yet and the explained tensor is (batch, classes) with the classes known."""
        if self._seed is not None or self.static is not None:
            return False
        shape = self.plan.graph.shape(self.explained)
        if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
            return False
        return self.plan.axis(self.explained) == 0

    @property
    def inputs(self) -> list[str]:
        """Float model inputs fed as rows (the ones an input-space path can move)."""
        return [n for n in self.explainer.float_inputs if n in self.feeds]

    @property
    def layer(self) -> str | None:
        return self.wrt[0] if self.wrt and self.wrt[0] not in self.feeds else None

    # --- runs -----------------------------------------------------------------------------
    def compiled(self, composite, wrt=None, explained=None, predicted_seed: bool = False):
        """(spec, rows) of the explainer of `composite` for `wrt` (default: this context's)."""
        wrt = tuple(self.wrt if wrt is None else wrt)
        explained = self.explained if explained is None else explained
        spec, session = self.plan.compiled(composite, wrt, explained, self.method, predicted_seed, self.static)
        return spec, self._explainer_rows(spec, session)

    def forward_session(self, tensors) -> Rows:
        """The forward model returning `tensors`, run on batch-first rows."""
        tensors = list(tensors)
        static = self.plan.static_for(tensors, self.static)
        return self.plan.forward(tensors, self.fixed, static)

    def forward(self, tensors, feeds=None) -> dict:
        """Values of any tensors on `feeds` (batch-first rows; default these inputs)."""
        tensors = list(tensors)
        feeds = self.feeds if feeds is None else feeds
        rows = self.forward_session(tensors)
        total = next(iter(feeds.values())).shape[0] if feeds else self.n
        parts = {t: [] for t in tensors}
        for _s, _e, out in rows.run_rows(total, lambda s, e: {k: v[s:e] for k, v in feeds.items()}, tensors):
            for t in tensors:
                parts[t].append(out[t])
        return {t: np.concatenate(v) for t, v in parts.items()}

    def backward(self, composite, feeds=None, seed=None):
        """Attributions (dict wrt -> array) and activations at wrt, for one set of rows."""
        if feeds is None and seed is None and self._seed_in_graph():
            # The predicted class of these very inputs: one run forms the seed and explains it.
            spec, rows = self.compiled(composite, predicted_seed=True)
            predicted = []
            result = self._run(spec, rows, self.feeds, None, predicted, keep_values=True)
            # The seed those classes give, for any later pass (static shape: no forward run).
            self._seed = self.explainer.seed_for(self._physical_feeds(), self.explained, np.concatenate(predicted))
            return result
        spec, rows = self.compiled(composite)
        own = feeds is None
        feeds = self.feeds if feeds is None else feeds
        seed = self.seed if seed is None else seed
        return self._run(spec, rows, feeds, seed, keep_values=own)

    def backward_rows_cut(self, composite, total: int, make_rows, consume, label: str | None = None):
        """Like backward_rows, with the layer cut out of the model and fed: make_rows returns
        (feeds, layer value, seed); attributions come back keyed by the layer."""
        spec, session, cut = self.plan.compiled_cut(composite, self.layer, self.explained, self.method, self.static)
        rows_session = self._explainer_rows(spec, session, cut={cut: self.layer})

        def rows(start, stop):
            feeds, value, seed = make_rows(start, stop)
            return {**feeds, cut: value}, seed

        def renamed(start, stop, attrs, acts):
            consume(start, stop, {self.layer: attrs[cut]}, acts)

        self.backward_rows_with(spec, rows_session, total, rows, renamed, label)

    def backward_rows(self, composite, total: int, make_rows, consume, label: str | None = None):
        """Run `total` rows in chunks: make_rows(start, stop) -> (feeds, seed);
        consume(start, stop, attributions, activations) is called for each chunk."""
        spec, rows = self.compiled(composite)
        self.backward_rows_with(spec, rows, total, make_rows, consume, label)

    def backward_resident(self, composite, moved: dict, total: int, chunk_rows, times_input: bool = False,
                          squares: bool = False, label: str | None = None):
        """Per-sample sums of attributions over `total` rows built on the device (see
        onnxplain.resident): moved = {input: (A, B)} batch-first arrays, row j of input k is
        A[ia_j] + alpha_j B[ib_j]; chunk_rows(start, stop) -> (ia, ib, alpha, W). Returns
        ({wrt: S1}, {wrt: S2}) shaped (n, ...), or None where the plain path must run (no
        device to keep state on, a layer, a layout that is not batch first, a fixed batch)."""
        from .. import resident
        from ..runtime import Session

        if self.layer is not None or any(t not in moved for t in self.wrt):
            return None
        spec, rows = self.compiled(composite)
        if not resident.wanted(rows.session) or spec.predicted or rows.static or spec.seed is None \
                or getattr(rows, "_one_by_one", False):
            return None
        held = [k for k in self.feeds if k not in moved]
        names = list(self.feeds) + [spec.seed] + list(spec.attributions.values())
        if any(rows.axes.get(k, 0) != 0 for k in names):
            return None
        if spec.seed in rows.ranks and self.seed.ndim != rows.ranks[spec.seed]:
            return None  # a batch of one the model squeezes away (Rows re-expands it)
        key = ("resident", composite.key(), tuple(self.wrt), self.explained, self.plan.key, tuple(moved),
               times_input, squares)
        e = self.explainer

        def make():
            model = resident.compose(spec, list(moved), held, times_input, squares)
            program = resident.Program(spec, Session(model, e.providers, e.memory_budget, e.threads), squares)
            return program, 2 * model.ByteSize()

        program = e._cache.get(key, make)
        arrays = {}
        for k, (a, b) in moved.items():
            arrays[resident.P + k + "/A"], arrays[resident.P + k + "/B"] = a, b
        for k in held:
            arrays[resident.P + k + "/A"] = self.feeds[k]
        arrays[resident.P + spec.seed + "/A"] = self.seed.astype(np.float32, copy=False)
        arrays.update({k: v for k, v in self.fixed.items() if k in program.session.input_names})
        try:
            s1, s2 = program.run(arrays, total, chunk_rows, rows.rows_per_run(), label)
        except InputError as exc:
            if _too_many_rows(exc, rows):
                return None
            raise
        shape = {t: moved[t][0].shape for t in self.wrt}
        s1 = {t: _finite(s1[t], self.method).reshape(shape[t]) for t in self.wrt}
        s2 = {t: _finite(s2[t], self.method).reshape(shape[t]) for t in s2 if t in shape}
        return s1, s2

    def forward_scores_resident(self, k: str, base: np.ndarray, window: tuple, total: int, chunk_rows,
                                label: str | None = None):
        """Scores sum(seed * explained) of `total` occluded rows built on the device (see
        onnxplain.resident.compose_occlusion): chunk_rows(start, stop) -> (samples, window
        corners (m, axes)). None where the plain path must run."""
        from .. import resident
        from ..runtime import Session, chunked

        rows = self.forward_session([self.explained])
        if not resident.wanted(rows.session) or rows.static or getattr(rows, "_one_by_one", False):
            return None
        if any(rows.axes.get(t, 0) != 0 for t in list(self.feeds) + [self.explained]):
            return None
        seed = self.seed.astype(np.float32, copy=False)
        if rows.ranks.get(self.explained, seed.ndim) != seed.ndim:
            return None  # a batch of one the model squeezes away (Rows re-expands it)
        x = self.feeds[k]
        held = [h for h in self.feeds if h != k]
        key = ("resident-occlusion", self.plan.key, self.explained, k, tuple(held), tuple(window), x.shape[1:])
        e = self.explainer

        def make():
            model = resident.compose_occlusion(rows.model, self.explained, k, held, seed.ndim, x.shape[1:], window)
            return Session(model, e.providers, e.memory_budget, e.threads), 2 * model.ByteSize()

        session = e._cache.get(key, make)
        arrays = {resident.P + k + "/A": x, resident.P + k + "/base": base.astype(x.dtype, copy=False),
                  resident.P + "seed/A": seed}
        arrays.update({resident.P + h + "/A": self.feeds[h] for h in held})
        arrays.update({h: v for h, v in self.fixed.items() if h in session.input_names})
        bound = {name: session.on_device(v) for name, v in arrays.items()}
        scores = np.empty(total, np.float64)

        def run_chunk(start, stop):
            samples, corners = chunk_rows(start, stop)
            feeds = {resident.P + "ia": samples.astype(np.int64), resident.P + "lo": corners.astype(np.int64)}
            return session.run_bound(bound, feeds, [resident.P + "score"])[resident.P + "score"]

        try:
            for start, stop, out in chunked(resident.Step(rows.rows_per_run()), total, run_chunk, label, None):
                scores[start:stop] = out
        except InputError as exc:
            if _too_many_rows(exc, rows):
                return None
            raise
        if not np.all(np.isfinite(scores)):
            raise InputError(f"method '{self.method}' got non-finite model outputs on perturbed inputs; "
                             "check the input's scale or the baseline")
        return scores

    def _run(self, spec, session, feeds, seed, predicted=None, keep_values: bool = False):
        total = next(iter(feeds.values())).shape[0] if feeds else self.n
        attrs = {t: [] for t in spec.attributions}
        acts = {}
        values = [] if keep_values and spec.values else None

        def rows(start, stop):
            return {k: v[start:stop] for k, v in feeds.items()}, None if seed is None else seed[start:stop]

        def consume(start, stop, a, c):
            for t in a:
                attrs[t].append(a[t])
            for t in c:
                acts.setdefault(t, []).append(c[t])

        self.backward_rows_with(spec, session, total, rows, consume, predicted=predicted, values=values)
        if values and all(v is not None for v in values):
            self.values = np.concatenate(values)
        return ({t: np.concatenate(v) for t, v in attrs.items()}, {t: np.concatenate(v) for t, v in acts.items()})

    def backward_rows_with(self, spec, session, total, make_rows, consume, label=None, predicted=None,
                           values=None):
        """`predicted` (a list), for an explainer that forms its seed: gets each chunk's
        classes; `values` (a list): each chunk's values of the explained tensor."""
        session = self._explainer_rows(spec, session) if not isinstance(session, Rows) else session
        outs = list(spec.attributions.values()) + list(spec.activations.values())
        if spec.predicted:
            outs.append(spec.predicted)
        # The explained tensor's values are read where they come out as rows (not a scalar
        # the model reduces to, not a tensor whose batch axis a run disproves).
        optional = [spec.values] if values is not None and spec.values else []
        chunk = {}

        def feeds_for(start, stop):
            f, s = make_rows(start, stop)
            chunk["feeds"] = f
            f = dict(f)
            if spec.seed is not None:
                f[spec.seed] = s.astype(np.float32, copy=False)
            return f

        for start, stop, out in session.run_rows(total, feeds_for, outs, label=label, optional=optional):
            if spec.predicted and predicted is not None:
                predicted.append(out[spec.predicted])
            if optional:
                values.append(out.get(spec.values))
            attrs = {t: _finite(out[o], self.method) for t, o in spec.attributions.items()}
            # Activations of the attributed tensors: layers come out of the explainer,
            # inputs are what was fed.
            acts = {t: out[o] for t, o in spec.activations.items()}
            acts.update({t: chunk["feeds"][t] for t in spec.attributions if t in chunk["feeds"]})
            consume(start, stop, attrs, acts)

    def activations(self, feeds=None) -> dict:
        """Values of the wrt tensors on `feeds` (inputs are themselves)."""
        feeds = self.feeds if feeds is None else feeds
        out = {t: feeds[t] for t in self.wrt if t in feeds}
        rest = [t for t in self.wrt if t not in feeds]
        if rest:
            out.update(self.forward(rest, feeds))
        return out


def _too_many_rows(exc: InputError, rows: Rows) -> bool:
    """Whether a device-resident run failed because the model takes one row at a time (a
    state input fixed at batch 1): the host path runs such models row by row."""
    from ..runtime import OutOfMemory

    if isinstance(exc, OutOfMemory) or rows.rows_per_run() <= 1:
        return False
    rows._one_by_one = True
    return True


def _finite(a: np.ndarray, method: str) -> np.ndarray:
    if not np.all(np.isfinite(a)):
        raise InputError(
            f"method '{method}' produced non-finite values (overflow in the model or its backward pass); "
            "check the input's scale, or choose another method"
        )
    return a
