"""What is explained: one `Target` grammar for Python `target=` and the CLI's `-t`.

Every form yields a *seed* shaped like the explained tensor: what is explained is always
`sum(seed * output)` per sample. The same seed scores the model on perturbed inputs for
the metrics (`TargetScorer`), so an explanation and its evaluation never disagree about
what was explained.

Forms (`FORMS` is the one-line summary errors show):
- `3`: class 3 for every sample; `3,1,4`: one class per sample; `pred` / None: the
  predicted class. These need a (batch, classes) output (size-1 axes aside): on a
  (batch, positions, vocab) output a bare class would silently pick a position.
- a float array: the seed itself, shaped like the output (or like one sample of it);
  a tuple: one element of each sample's output, e.g. (position, token).
- `pos:T:V`: token V at position T of a (batch, positions, vocab) output; `last:V`.
- `step:T[:C]`, `steps:T0-T1[:C]`: frames T (T0 to T1, both included) of a sequence
  output (batch, time[, classes]) in any layout: the class axis is the last, the time
  axis the other non-batch one (so (time, batch, classes) works). Without C each frame's
  predicted class.
- `region:x1,y1,x2,y2[:C]`, `mask:FILE.png[:C]`: the sum of class C over an area of a
  dense (batch, classes, H, W) map, in the map's pixels (x along W, x2/y2 exclusive; a
  mask's non-zero pixels); without C every class.
- `detection:I[@DECODER]`, `box:x1,y1,x2,y2[:C][@DECODER]`: one detection of a detector,
  the I-th by score or the one best matching the box (IoU; of class C where given). One
  forward pass decodes the outputs (`onnxplain.detection`: layout read off the output
  shapes unless DECODER names it, score threshold, NMS), then the target is the seed of
  that detection's score on the scores output (`resolve_target`, before any explainer run).
- `text:"REFERENCE"`: for a sentence encoder, dot(emb(text), emb(REFERENCE)) with the
  model's pooling (`TextTarget`); resolved to a seed by `onnxplain.text`, which has the
  tokenizer (`explain_text`, the CLI's --text/--tokenizer). `text-cos:"REFERENCE"`: the
  cosine of the two embeddings, built into the graph as a scalar output by `onnxplain.text`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from .errors import InputError, OptionError

FORMS = ("target forms: 3 (class 3 for every sample), 3,1,4 (one class per sample), pred (the predicted class; "
         "these need a (batch, classes) output), a float seed array or FILE.npy shaped like the output, "
         "pos:T:V (token V at position T of a (batch, positions, vocab) output), last:V, step:T[:C], "
         "steps:T0-T1[:C] (frames of a sequence output), region:x1,y1,x2,y2[:C] and mask:FILE.png[:C] "
         "(an area of a dense (batch, classes, H, W) map), detection:I and box:x1,y1,x2,y2[:C] (one detection of a "
         "detector; @yolov8|yolov5|yolox|ssd|detr names the output layout), text:\"REF\" and text-cos:\"REF\" (a "
         "sentence encoder explained on text with its tokenizer: the dot product or the cosine of the embeddings)")

_INT = r"-?\d+"


def _fmt(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


class Target:
    """A parsed target. `text` is its canonical spelling (what run keys hash)."""

    text = ""

    def seed(self, shape, batch_axis: int = 0, output=None) -> np.ndarray:
        """The float32 seed for an explained tensor of `shape` whose batch is `batch_axis`,
        in that same layout. `output` (the tensor's values, same layout) is needed where
        `needs_output` says so (a predicted class)."""
        shape, b = _layout(shape, batch_axis)
        logical = (shape[b],) + shape[:b] + shape[b + 1:]
        out = None
        if output is not None:
            out = np.moveaxis(np.asarray(output), b, 0)
            if out.shape != logical:
                raise InputError(f"the output values have shape {np.shape(output)}, not {_fmt(shape)}")
        if out is None and self.needs_output(shape, b):
            raise InputError(f"target '{self.text}' needs the output's values to find the predicted class")
        seed = np.asarray(self._seed(logical, out), dtype=np.float32)
        return np.ascontiguousarray(np.moveaxis(seed, 0, b))

    def needs_output(self, shape, batch_axis: int = 0) -> bool:
        return False

    def prob_axis(self, logical) -> int | None:
        """The (batch-first) axis a softmax runs over when probabilities are scored; None
        where the seed does not pick one class (the raw score is scored then)."""
        return None

    def classes(self, logical, out) -> np.ndarray | None:
        """The class explained per sample, where the target is one class per sample."""
        return None

    def describe(self, i: int, classes=None) -> str:
        return self.text

    def _seed(self, logical, out) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self):
        return f"Target({self.text!r})"

    def __eq__(self, other):
        return isinstance(other, Target) and other.text == self.text

    def __hash__(self):
        return hash(self.text)


def _layout(shape, batch_axis):
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise InputError("the explained tensor is 0-d: it has no batch axis to explain samples along")
    b = 0 if batch_axis is None else int(batch_axis)
    if not -len(shape) <= b < len(shape):
        raise InputError(f"batch axis {batch_axis} is not an axis of the output shape {_fmt(shape)}")
    return shape, b % len(shape)


def _class_axis(logical, text) -> int | None:
    """The class axis of a (batch, classes) output, size-1 axes aside; None for one score
    per sample. Any other shape is an error: a class index would silently mean something else."""
    rest = logical[1:]
    if not rest:
        return None
    big = [i for i, d in enumerate(rest) if d != 1]
    if len(big) > 1:
        raise OptionError(f"target '{text}' is a class, but the explained output has shape {_fmt(logical)} "
                          f"(batch first), not (batch, classes): say what to explain; {FORMS}")
    return 1 + (big[0] if big else len(rest) - 1)


def _one_hot(logical, classes, text) -> np.ndarray:
    n = logical[0]
    axis = _class_axis(logical, text)
    if axis is None:
        if np.any(np.asarray(classes) != 0):
            raise InputError(f"target '{text}': the explained output has shape {_fmt(logical)}, one score per "
                             "sample: there are no classes to choose from (use 0 or pred)")
        return np.ones(logical, np.float32)
    k = logical[axis]
    classes = np.asarray(classes, dtype=np.int64)
    bad = classes[(classes < -k) | (classes >= k)]
    if bad.size:
        raise InputError(f"target {int(bad[0])} is out of range: the output has {k} classes")
    seed = np.zeros((n, k), np.float32)
    seed[np.arange(n), classes % k] = 1.0
    return seed.reshape(logical)  # the other axes have size 1: the same element order


class _Classes(Target):
    def __init__(self, classes):
        self.values = [int(c) for c in classes]
        self.text = ",".join(map(str, self.values))

    def _per_sample(self, n):
        if len(self.values) == 1:
            return np.full(n, self.values[0])
        if len(self.values) != n:
            raise InputError(f"got {len(self.values)} targets for a batch of {n}; give one class per sample")
        return np.asarray(self.values)

    def _seed(self, logical, out):
        return _one_hot(logical, self._per_sample(logical[0]), self.text)

    def classes(self, logical, out):
        axis = _class_axis(logical, self.text)
        k = logical[axis] if axis is not None else 1
        return self._per_sample(logical[0]) % k

    def prob_axis(self, logical):
        return _class_axis(logical, self.text)

    def describe(self, i, classes=None):
        return f"class {self.values[0] if len(self.values) == 1 else self.values[i]}"


class _Predicted(Target):
    text = "pred"

    def needs_output(self, shape, batch_axis=0):
        return len(shape) > 1

    def classes(self, logical, out):
        axis = _class_axis(logical, self.text)
        if axis is None:
            return np.zeros(logical[0], np.int64)
        return np.asarray(out).reshape(logical[0], -1).argmax(axis=1)

    def _seed(self, logical, out):
        return _one_hot(logical, self.classes(logical, out), self.text)

    def prob_axis(self, logical):
        return _class_axis(logical, self.text)

    def describe(self, i, classes=None):
        return "predicted" if classes is None else f"class {int(classes[i])}"


class _Seed(Target):
    """The seed itself. `prob` keeps the axis a resolved target picked a class on (so the
    metrics score the same probability on every copy of a sample)."""

    def __init__(self, array, name=None, prob=None):
        self.prob = prob
        a = np.asarray(array, dtype=np.float32)
        if not np.all(np.isfinite(a)):
            raise InputError("the seed array contains NaN or Inf")
        self.array = a
        digest = hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()[:16]
        self.text = name or f"seed:{'x'.join(map(str, a.shape))}:{digest}"

    def seed(self, shape, batch_axis=0, output=None):
        shape, b = _layout(shape, batch_axis)
        one = shape[:b] + shape[b + 1:]
        a = self.array
        if a.shape == one:
            a = np.broadcast_to(np.expand_dims(a, b), shape)
        if a.shape != shape:
            raise InputError(f"a seed array must have the explained output's shape {_fmt(shape)} "
                             f"(or one sample's, {_fmt(one)}), got {_fmt(a.shape)}")
        return np.ascontiguousarray(a, dtype=np.float32)

    def prob_axis(self, logical):
        return self.prob


class _Index(Target):
    """One element of each sample's output, by its index over the non-batch axes."""

    def __init__(self, index):
        self.per_sample = isinstance(index, list)
        self.index = [tuple(int(v) for v in i) for i in index] if self.per_sample else tuple(int(v) for v in index)
        self.text = "index:" + (";".join(",".join(map(str, i)) for i in self.index) if self.per_sample
                                else ",".join(map(str, self.index)))

    def _seed(self, logical, out):
        n = logical[0]
        index = self.index if self.per_sample else [self.index] * n
        if len(index) != n:
            raise InputError(f"got {len(index)} targets for a batch of {n}; give one per sample")
        seed = np.zeros(logical, np.float32)
        for i, idx in enumerate(index):
            if len(idx) != len(logical) - 1 or any(not -d <= v < d for v, d in zip(idx, logical[1:])):
                raise InputError(f"target {idx} is out of range for the output shape {_fmt(logical[1:])} "
                                 "of one sample")
            seed[(i,) + idx] = 1.0
        return seed


def _check(value, size, what, text):
    if not -size <= value < size:
        raise InputError(f"target '{text}': {what} {value} is out of range (0..{size - 1})")
    return value % size


class _Position(Target):
    def __init__(self, position, token, text):
        self.position, self.token, self.text = position, token, text

    def _seed(self, logical, out):
        if len(logical) != 3:
            raise OptionError(f"target '{self.text}' needs a (batch, positions, vocab) output; the explained "
                              f"output has shape {_fmt(logical)} (batch first); {FORMS}")
        t = _check(self.position, logical[1], "position", self.text)
        v = _check(self.token, logical[2], "token", self.text)
        seed = np.zeros(logical, np.float32)
        seed[:, t, v] = 1.0
        return seed

    def prob_axis(self, logical):
        return 2

    def describe(self, i, classes=None):
        return f"token {self.token} at " + ("the last position" if self.position == -1 else f"position {self.position}")


class _Steps(Target):
    def __init__(self, first, last, cls, text):
        self.first, self.last, self.cls, self.text = first, last, cls, text

    def _frames(self, logical):
        if len(logical) not in (2, 3):
            raise OptionError(f"target '{self.text}' needs a sequence output (batch, time) or (batch, time, "
                              f"classes) in any layout; the explained output has shape {_fmt(logical)} "
                              f"(batch first); {FORMS}")
        t = logical[1]
        first = _check(self.first, t, "frame", self.text)
        last = _check(self.last, t, "frame", self.text)
        if last < first:
            raise OptionError(f"target '{self.text}': the last frame comes before the first")
        return first, last

    def needs_output(self, shape, batch_axis=0):
        return self.cls is None and len(shape) == 3

    def _seed(self, logical, out):
        first, last = self._frames(logical)
        seed = np.zeros(logical, np.float32)
        if len(logical) == 2:
            if self.cls is not None:
                raise OptionError(f"target '{self.text}': the output (batch, time) {_fmt(logical)} has no class "
                                  "axis; leave out the class")
            seed[:, first:last + 1] = 1.0
            return seed
        if self.cls is None:  # each frame's predicted class
            winners = np.asarray(out)[:, first:last + 1].argmax(axis=2)
            np.put_along_axis(seed[:, first:last + 1], winners[..., None], 1.0, axis=2)
        else:
            seed[:, first:last + 1, _check(self.cls, logical[2], "class", self.text)] = 1.0
        return seed

    def prob_axis(self, logical):
        return 2 if len(logical) == 3 else None

    def describe(self, i, classes=None):
        frames = f"frame {self.first}" if self.first == self.last else f"frames {self.first}-{self.last}"
        return frames + ("" if self.cls is None else f", class {self.cls}")


class _Area(Target):
    """An area of a dense map: a rectangle, or the non-zero pixels of a mask image."""

    def __init__(self, cls, text, box=None, mask=None):
        self.cls, self.text, self.box, self.mask = cls, text, box, mask

    def _seed(self, logical, out):
        if len(logical) not in (3, 4):
            raise OptionError(f"target '{self.text}' needs a dense map (batch, classes, H, W) or (batch, H, W); "
                              f"the explained output has shape {_fmt(logical)} (batch first); {FORMS}")
        h, w = logical[-2:]
        area = np.zeros((h, w), bool)
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
                raise InputError(f"target '{self.text}': the region must lie in the {w}x{h} map (W x H) with "
                                 "x1 < x2, y1 < y2 (x2, y2 exclusive)")
            area[y1:y2, x1:x2] = True
        else:
            if self.mask.shape != (h, w):
                raise InputError(f"target '{self.text}': the mask is {self.mask.shape[1]}x{self.mask.shape[0]} "
                                 f"pixels, the map {w}x{h}; draw the mask at the map's size")
            area = self.mask
        seed = np.zeros(logical, np.float32)
        if len(logical) == 3:
            if self.cls is not None:
                raise OptionError(f"target '{self.text}': the map {_fmt(logical)} has no class axis; leave out "
                                  "the class")
            seed[:, area] = 1.0
        elif self.cls is None:
            seed[:, :, area] = 1.0
        else:
            seed[:, _check(self.cls, logical[1], "class", self.text), area] = 1.0
        return seed

    def prob_axis(self, logical):
        return 1 if self.cls is not None and len(logical) == 4 else None

    def describe(self, i, classes=None):
        where = "region " + ",".join(map(str, self.box)) if self.box is not None else self.text.split(":")[0]
        return where + ("" if self.cls is None else f", class {self.cls}")


class _Detect(Target):
    """One detection of a detector, before the outputs are decoded: `resolve` runs the
    model once on the inputs, decodes every sample's detections and picks one per sample."""

    def __init__(self, text, index=None, box=None, cls=None, decoder=None, score_threshold=None,
                 iou_threshold=None):
        from . import detection as D

        self.text, self.index, self.box, self.cls, self.decoder = text, index, box, cls, decoder
        self.score_threshold = D.SCORE_THRESHOLD if score_threshold is None else float(score_threshold)
        self.iou_threshold = D.IOU_THRESHOLD if iou_threshold is None else float(iou_threshold)

    def seed(self, shape, batch_axis=0, output=None):
        raise OptionError(f"target '{self.text}' is a detection: it is found on all the detector's outputs "
                          "(onnxplain.target.resolve_target), not on one tensor's shape")

    def with_decoder(self, decoder) -> "_Detect":
        """The same target read with another decoder (the CLI's --decoder)."""
        if decoder is None:
            return self
        base = self.text.split("@")[0]
        return _Detect(f"{base}@{decoder.lower()}", self.index, self.box, self.cls, decoder.lower(),
                       self.score_threshold, self.iou_threshold)

    def detections(self, explainer, feeds):
        """(layout, per-sample detections, per-sample outputs, image size): one forward pass."""
        from . import detection as D
        from .methods.blackbox import layout as input_layout

        g = explainer.graph
        names = [o for o in g.outputs if g.is_float(o)]
        rows = explainer._forward(feeds, names)  # batch first
        n = next(iter(rows.values())).shape[0]
        layout = D.find_layout({k: v.shape[1:] for k, v in rows.items()}, self.decoder)
        primary = next((k for k in g.inputs if k in feeds and feeds[k].dtype.kind == "f"), next(iter(feeds)))
        shape = feeds[primary].shape
        _, spatial = input_layout(shape)
        size = tuple(shape[a] for a in spatial[-2:]) if len(spatial) >= 2 else (1, shape[-1])
        per_sample = [{k: v[i] for k, v in rows.items()} for i in range(n)]
        found = [D.decode(layout, o, size, self.score_threshold, self.iou_threshold) for o in per_sample]
        return layout, found, per_sample, size

    def resolve(self, explainer, feeds) -> "_Detected":
        from . import detection as D

        layout, found, per_sample, size = self.detections(explainer, feeds)
        chosen = []
        for i, dets in enumerate(found):
            if self.index is not None:
                if self.index >= len(dets):
                    raise InputError(f"target '{self.text}': sample {i} has {len(dets)} detection(s) above the "
                                     f"score threshold {self.score_threshold} ({layout.describe()}); "
                                     "--list-detections shows them")
                chosen.append(dets[self.index])
            else:
                chosen.append(dets[D.match(dets, self.box, self.cls)])
        seeds = np.stack([D.seed(layout, d, o) for d, o in zip(chosen, per_sample)])
        axis = explainer.plan(feeds).axis(layout.scores) or 0
        return _Detected(np.moveaxis(seeds, 0, axis), self.text, layout, chosen, found, axis, size)


class _Detected(_Seed):
    """A detection target resolved on the inputs: the seed of each sample's chosen detection
    on the scores output (`output`), the detections, and a scorer of perturbed rows that
    scores what the decoder scores (objectness x class where the layout has both)."""

    def __init__(self, array, text, layout, chosen, found, axis, image_size):
        super().__init__(array)
        self.text = text
        self.base_text, self.layout, self.chosen, self.found = text, layout, chosen, found
        self.axis, self.image_size, self.output = axis, image_size, layout.scores

    def subset(self, samples) -> "_Detected":
        samples = np.asarray(samples, dtype=np.int64)
        return _Detected(np.take(self.array, samples, axis=self.axis), self.base_text, self.layout,
                         [self.chosen[s] for s in samples], [self.found[s] for s in samples], self.axis,
                         self.image_size)

    def score_rows(self, logical, samples):
        """(R,) objectness x class at each row's chosen anchor; None where the seed's
        product with the output is the score itself."""
        from .detection import _yolo_rows

        if not self.layout.has_objectness:
            return None
        out = []
        for row, s in zip(logical, np.asarray(samples, dtype=np.int64)):
            d = self.chosen[s]
            r = _yolo_rows(self.layout, row)
            out.append(r[d.index, 4] * r[d.index, 5 + d.cls])
        return np.asarray(out, dtype=np.float64)

    def describe(self, i, classes=None):
        from .detection import explained_score

        d = self.chosen[i]
        box = ",".join(f"{v:.0f}" for v in d.box)
        return f"{self.base_text}: class {d.cls} box {box} score {d.score:.3f} ({explained_score(self.layout)})"


def _parse_detection(kind, rest, raw):
    rest, at, decoder = rest.partition("@")
    decoder = decoder.strip().lower() or None
    if at:
        from .detection import LAYOUTS

        if decoder not in LAYOUTS:
            raise OptionError(f"target '{raw}': unknown decoder '{decoder}'; choose from {', '.join(LAYOUTS)}")
    suffix = f"@{decoder}" if decoder else ""
    if kind == "detection":
        if not re.fullmatch(r"\d+", rest):
            raise OptionError(f"target '{raw}' is not detection:I (the I-th detection by score, e.g. detection:0)")
        return _Detect(f"detection:{int(rest)}{suffix}", index=int(rest), decoder=decoder)
    num = r"-?\d+(?:\.\d+)?"
    m = re.fullmatch(rf"({num}),({num}),({num}),({num})(?::(\d+))?", rest.replace(" ", ""))
    if not m:
        raise OptionError(f"target '{raw}' is not box:x1,y1,x2,y2[:C] (input pixels, e.g. box:10,20,50,60:0)")
    box = tuple(float(m[i]) for i in range(1, 5))
    if box[0] >= box[2] or box[1] >= box[3]:
        raise OptionError(f"target '{raw}' is an empty box: need x1 < x2 and y1 < y2")
    cls = None if m[5] is None else int(m[5])
    text = "box:" + ",".join(f"{v:g}" for v in box) + ("" if cls is None else f":{cls}") + suffix
    return _Detect(text, box=box, cls=cls, decoder=decoder)


def resolve_target(explainer, feeds, target, output=None):
    """(target, output) to explain with: a detection target decoded on these inputs (one
    forward pass) and the scores output it seeds; a target that names its output (a
    resolved detection) with that output; anything else unchanged."""
    if isinstance(target, str) and target.split(":", 1)[0].strip().lower() in ("detection", "box"):
        target = parse_target(target)
    if isinstance(target, _Detect):
        target = target.resolve(explainer, feeds)
    named = getattr(target, "output", None) if isinstance(target, Target) else None
    if named is not None:
        if output is not None and explainer._output_name(output) != named:
            raise OptionError(f"target '{target.text}' explains the output '{named}', not '{output}'")
        output = named
    return target, output


PREDICTED = _Predicted()

# Forms another issue will bring: parsed, then refused with what they need.
_NOT_YET: dict = {}


class TextTarget(Target):
    """`text:"REFERENCE"`: why the explained text's embedding is close to REFERENCE's, the
    score dot(emb(text), emb(REFERENCE)). Its seed needs the tokenizer and the model, so
    `onnxplain.text.text_target_seed` forms it; on a bare tensor shape it is an error.
    `text-cos:"REFERENCE"` (cosine=True) explains the cosine instead, which no seed on the
    model's output can express: `onnxplain.text` adds it to the graph as a scalar output."""

    def __init__(self, reference: str, cosine: bool = False):
        self.reference = reference
        self.cosine = bool(cosine)
        self.text = ("text-cos:" if self.cosine else "text:") + json.dumps(reference)

    def seed(self, shape, batch_axis=0, output=None):
        raise OptionError(f"target '{self.text}' compares sentence embeddings: it needs the tokenizer to embed the "
                          "reference text; explain text with onnxplain.text.explain_text(explainer, tokenizer, text, "
                          "target=...) or the CLI's --text/--tokenizer")


def _parse_text(rest: str, raw: str, cosine: bool = False) -> TextTarget:
    rest = rest.strip()
    if len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "\"'":
        rest = rest[1:-1]
    kind = "text-cos" if cosine else "text"
    if not rest.strip():
        raise OptionError(f"target '{raw}' is not {kind}:\"REFERENCE\" (a reference sentence, e.g. "
                          f"{kind}:\"a great film\")")
    return TextTarget(rest, cosine=cosine)


def parse_target(text: str) -> Target:
    """A target from its spelling (the CLI's `-t`). Raises OptionError naming the forms."""
    raw = str(text).strip()
    low = raw.lower()
    if low in ("pred", "predicted"):
        return PREDICTED
    if re.fullmatch(rf"{_INT}(\s*,\s*{_INT})*", raw):
        return _Classes([int(v) for v in raw.split(",")])
    kind, sep, rest = raw.partition(":")
    kind = kind.strip().lower()
    if not sep and low.endswith(".npy"):
        from .io import load_array

        return _Seed(load_array(raw), name=f"seed:{raw}:{_file_digest(raw)}")
    if kind in ("detection", "box"):
        return _parse_detection(kind, rest.strip(), raw)
    if kind in ("text", "text-cos"):
        return _parse_text(rest, raw, cosine=kind == "text-cos")
    if kind in _NOT_YET:
        pattern, spelling, needs = _NOT_YET[kind]
        if not re.fullmatch(pattern, rest.strip()):
            raise OptionError(f"target '{raw}' is not {spelling}")
        raise OptionError(f"target '{raw}': {spelling} needs {needs}, which onnxplain does not have yet; "
                          f"until then give the seed itself (a float array or FILE.npy); {FORMS}")
    if kind == "pos":
        m = re.fullmatch(rf"({_INT}):(\d+)", rest.strip())
        if m:
            return _Position(int(m[1]), int(m[2]), f"pos:{m[1]}:{m[2]}")
        raise OptionError(f"target '{raw}' is not pos:T:V (position T, token V, e.g. pos:3:1024)")
    if kind == "last":
        if re.fullmatch(r"\d+", rest.strip()):
            return _Position(-1, int(rest), f"last:{int(rest)}")
        raise OptionError(f"target '{raw}' is not last:V (token V at the last position, e.g. last:1024)")
    if kind in ("step", "steps"):
        span = rf"({_INT})" if kind == "step" else r"(\d+)-(\d+)"
        m = re.fullmatch(span + r"(?::(\d+))?", rest.strip())
        if not m:
            raise OptionError(f"target '{raw}' is not " + ("step:T[:C] (e.g. step:12 or step:12:3)" if kind == "step"
                              else "steps:T0-T1[:C] (frames T0 to T1, both included, e.g. steps:4-9:3)"))
        first = int(m[1])
        last, cls = (first, m[2]) if kind == "step" else (int(m[2]), m[3])
        if last < first:
            raise OptionError(f"target '{raw}': the last frame comes before the first")
        return _Steps(first, last, None if cls is None else int(cls), raw.replace(" ", "").lower())
    if kind == "region":
        m = re.fullmatch(r"(\d+),(\d+),(\d+),(\d+)(?::(\d+))?", rest.replace(" ", ""))
        if not m:
            raise OptionError(f"target '{raw}' is not region:x1,y1,x2,y2[:C] (map pixels, x2 and y2 exclusive, "
                              "e.g. region:10,20,50,60:3)")
        box = tuple(int(m[i]) for i in range(1, 5))
        if box[0] >= box[2] or box[1] >= box[3]:
            raise OptionError(f"target '{raw}' is an empty region: need x1 < x2 and y1 < y2 (the end is exclusive)")
        cls = None if m[5] is None else int(m[5])
        return _Area(cls, f"region:{','.join(map(str, box))}" + ("" if cls is None else f":{cls}"), box=box)
    if kind == "mask":
        path, cls = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and tail.strip().isdigit():
            path, cls = head, int(tail)
        if not path.strip():
            raise OptionError(f"target '{raw}' is not mask:FILE.png[:C]")
        mask = _read_mask(path.strip())
        return _Area(cls, f"mask:{_file_digest(path.strip())}" + ("" if cls is None else f":{cls}"), mask=mask)
    raise OptionError(f"'{raw}' is not a target; {FORMS}")


def _file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _read_mask(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"mask file not found: {p}")
    try:
        with Image.open(p) as img:
            mask = np.asarray(img.convert("L")) > 0
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read the mask {p} as an image: {exc}") from None
    if not mask.any():
        raise InputError(f"the mask {p} has no non-zero pixel: there is no area to explain")
    return mask


def as_target(value) -> Target:
    """Any accepted Python value as a Target: None (predicted), a Target, a string of the
    grammar, an int (a class), a sequence of ints (one class per sample), an int array (the
    same), a float array (the seed), a tuple (an element index), a list of tuples."""
    if value is None:
        return PREDICTED
    if isinstance(value, Target):
        return value
    if isinstance(value, str):
        return parse_target(value)
    if isinstance(value, bool):
        raise OptionError(f"target {value!r} is not a class index; {FORMS}")
    if isinstance(value, (int, np.integer)):
        return _Classes([value])
    if isinstance(value, tuple):
        return _Index(value)
    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        return _Index(list(value))
    a = np.asarray(value)
    if a.dtype.kind == "f":
        return _Seed(a)
    if a.dtype.kind in "iu" and a.ndim <= 1 and a.size:
        return _Classes(a.reshape(-1).tolist())
    raise OptionError(f"target {value!r} is not understood; {FORMS}")


class TargetScorer:
    """A target resolved on the explained tensor's values for the original inputs: its seed
    (a predicted class is found once and kept, as the metrics need), the score of any rows
    made from those samples (`sum(seed * output)`, optionally of softmax probabilities),
    and the fixed target to explain those rows with."""

    def __init__(self, target, output, batch_axis: int = 0):
        self.target = as_target(target)
        output = np.asarray(output)
        shape, self.batch_axis = _layout(output.shape, batch_axis)
        self.seed = self.target.seed(shape, self.batch_axis, output)  # physical layout
        logical = np.moveaxis(output, self.batch_axis, 0)
        self.logical_seed = np.moveaxis(self.seed, self.batch_axis, 0).astype(np.float64)
        self.prob_axis = self.target.prob_axis(logical.shape)
        if self.prob_axis is not None and logical.shape[self.prob_axis] < 2:
            self.prob_axis = None  # one score per sample: no softmax over a single value
        self.classes = self.target.classes(logical.shape, logical)
        self.n = logical.shape[0]

    def describe(self, i: int) -> str:
        return self.target.describe(i, self.classes)

    def explain_target(self, samples):
        """What to pass as `target=` to explain rows made from `samples`: their classes
        where the target is a class, else their seeds (in the tensor's layout)."""
        samples = np.asarray(samples, dtype=np.int64)
        if isinstance(self.target, _Detected):  # keeps its output and its scoring
            return self.target.subset(samples)
        if self.classes is not None:
            return [int(c) for c in self.classes[samples]]
        seed = np.moveaxis(self.logical_seed[samples], 0, self.batch_axis)
        return _Seed(seed, name=f"{self.target.text} (resolved)", prob=self.prob_axis)

    def scores(self, output, samples, probability: bool = False) -> np.ndarray:
        """(R,) the explained score of rows `output` (the tensor's layout, R along the batch
        axis), row r made from sample samples[r]."""
        out = np.moveaxis(np.asarray(output, dtype=np.float64), self.batch_axis, 0)
        if isinstance(self.target, _Detected):
            product = self.target.score_rows(out, samples)
            if product is not None:
                return product
        if probability and self.prob_axis is not None:
            z = out - out.max(axis=self.prob_axis, keepdims=True)
            e = np.exp(z)
            out = e / e.sum(axis=self.prob_axis, keepdims=True)
        seed = self.logical_seed[np.asarray(samples, dtype=np.int64)]
        return np.einsum("ij,ij->i", seed.reshape(len(seed), -1), out.reshape(len(out), -1))

    @property
    def probability_scored(self) -> bool:
        return self.prob_axis is not None
