"""Detector outputs decoded into detections, as a user of the detector would decode them.

A `Layout` says which outputs hold the boxes and the scores and how (`LAYOUTS`):

- `yolov8`: one output (4 + C, anchors) -- centre x, centre y, width, height in input
  pixels, then C class scores (YOLOv8, v11; also read transposed, (anchors, 4 + C)).
- `yolov5`: one output (anchors, 5 + C) -- box, objectness, C class scores; a detection's
  score is objectness x class score (YOLOv5, v7).
- `yolox`: as yolov5, with YOLOX's raw boxes: centre offsets from the cell and log sizes at
  strides 8, 16 and 32 (what its export writes unless told to decode in the graph).
- `ssd`: two outputs, boxes (anchors, 4) as x1, y1, x2, y2 (in pixels, or normalised to
  [0, 1]) and scores (anchors, C); scores that sum to 1 over the classes (a softmax) hold
  a background class in column 0, which is never a detection.
- `detr`: class logits (queries, C + 1; the last is "no object") and boxes (queries, 4) as
  normalised centre x, centre y, width, height; the score is the softmax probability.
- `rtdetr`: RT-DETR's (and Deformable DETR's, DINO's) two outputs, class logits (queries, C)
  with no "no object" class and boxes as DETR's; a score is the sigmoid of one logit, and a
  query is a detection of every class whose score passes the threshold (the top-k over
  queries x classes of their post-processors). Never read off the shapes (the outputs look
  like DETR's): name it.
- `nms`: detections already selected inside the graph, one output (K, 6) of rows x1, y1, x2,
  y2, score, class (the export with NMS of YOLOv8, padded with zero rows); never read off
  the shapes (a (K, 6) output is also a one-class YOLOv5): name it.

Shapes are given per sample (the batch axis removed). `find_layout` reads the layout off
the output shapes (names help tell DETR from SSD), `decode` applies the score threshold
and the per-class non-maximum suppression a user would run (none for DETR, whose set
prediction has no duplicates), and `seed` forms the seed of one detection's score on the
tensor the explainer differentiates (the scores output).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, OptionError

LAYOUTS = ("yolov8", "yolov5", "yolox", "ssd", "detr", "rtdetr", "nms")
# The defaults of the detectors' own predict functions (YOLOv5/v8: conf 0.25; NMS IoU 0.45
# as YOLOv5 and most deployments; DETR keeps queries above 0.5 in its demos, but the
# threshold is one number for every layout here).
SCORE_THRESHOLD = 0.25
IOU_THRESHOLD = 0.45
MAX_DETECTIONS = 300


@dataclass
class Detection:
    """One detection: box (x1, y1, x2, y2) in input pixels, its class and score, the raw
    index it came from (anchor or query along the scores output), the class-score vector
    there and the objectness (layouts that have one)."""

    box: tuple
    cls: int
    score: float
    index: int
    class_scores: np.ndarray = field(repr=False)
    objectness: float | None = None

    def as_dict(self) -> dict:
        d = {"box": [round(float(v), 2) for v in self.box], "class": int(self.cls),
             "score": round(float(self.score), 4), "index": int(self.index)}
        if self.objectness is not None:
            d["objectness"] = round(float(self.objectness), 4)
        return d


@dataclass
class Layout:
    """How a detector's outputs read: `kind` (one of LAYOUTS), the scores output (the one
    explained) and the boxes output (the same for the YOLO layouts), whether the YOLO
    output is anchors-last (`transposed`: (4 + C, anchors)), the class count."""

    kind: str
    scores: str
    boxes: str
    classes: int
    transposed: bool = False

    @property
    def has_objectness(self) -> bool:
        return self.kind in ("yolov5", "yolox")

    def describe(self) -> str:
        if self.kind in ("yolov8", "yolov5", "yolox"):
            k = self.classes + (5 if self.has_objectness else 4)
            shape = f"({k}, anchors)" if self.transposed else f"(anchors, {k})"
            return f"{self.kind} output '{self.scores}' {shape}, {self.classes} classes"
        return f"{self.kind}: scores '{self.scores}', boxes '{self.boxes}', {self.classes} classes"


def _shapes_text(shapes) -> str:
    return ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())


def find_layout(shapes: dict, decoder: str | None = None) -> Layout:
    """The layout of a detector from its float outputs' per-sample shapes (name -> shape,
    batch removed, in the model's order). `decoder` forces the kind."""
    if decoder is not None:
        decoder = decoder.lower()
        if decoder not in LAYOUTS:
            raise OptionError(f"unknown decoder '{decoder}'; choose from {', '.join(LAYOUTS)}")
    two_d = {}  # the outputs that are one matrix per sample, size-1 axes aside
    for k, v in shapes.items():
        v = tuple(int(d) for d in v)
        squeezed = v if len(v) == 2 else tuple(d for d in v if d != 1)
        if len(squeezed) == 2:
            two_d[k] = squeezed
    pairs = _pairs(two_d)
    if decoder in (None, "detr", "rtdetr", "ssd") and pairs:
        boxes, scores = pairs[0]
        named_detr = any(w in (boxes + scores).lower() for w in ("logit", "pred_boxes", "detr"))
        kind = decoder or ("detr" if named_detr else "ssd")
        k = two_d[scores][1]
        return Layout(kind, scores, boxes, k - 1 if kind == "detr" else k)
    if decoder == "nms":
        rows = [(k, v) for k, v in two_d.items() if v[1] == 6]
        if not rows:
            raise InputError(f"decoder 'nms' needs an output (K, 6) of rows x1, y1, x2, y2, score, class; the "
                             f"model's float outputs are {_shapes_text(shapes)}")
        return Layout("nms", rows[0][0], rows[0][0], 0)
    if decoder in ("detr", "rtdetr", "ssd"):
        raise InputError(f"decoder '{decoder}' needs two outputs, boxes (N, 4) and scores (N, C), one row per "
                         f"anchor or query; the model's float outputs are {_shapes_text(shapes)}")
    singles = [(k, v) for k, v in two_d.items() if (max(v) if decoder else min(v)) >= 5]  # 4 box values + a score
    if not singles:
        raise InputError("no detector layout fits the model's float outputs "
                         f"{_shapes_text(shapes)}: the decoders read {', '.join(LAYOUTS)} "
                         "(one (anchors, 4+C[+1]) output or its transpose, or boxes + scores outputs); "
                         "for rows already selected by NMS in the graph (x1, y1, x2, y2, score, class) name "
                         "decoder nms")
    name, (a, b) = singles[0]
    transposed = a < b  # (4 + C, anchors): YOLOv8's own export
    k = a if transposed else b
    kind = decoder or ("yolov8" if transposed else "yolov5")
    classes = k - (5 if kind in ("yolov5", "yolox") else 4)
    if classes < 1:
        raise InputError(f"decoder '{kind}' on '{name}' {(a, b)}: {k} values per anchor leave no class scores")
    return Layout(kind, name, name, classes, transposed)


def _pairs(two_d: dict) -> list:
    """(boxes, scores) outputs: a (N, 4) output and a (N, K) one with the same N."""
    out = []
    for b, sb in two_d.items():
        if sb[1] != 4:
            continue
        for s, ss in two_d.items():
            if s != b and ss[0] == sb[0] and ss[1] >= 1 and not (ss[1] == 4 and s < b):
                out.append((b, s))
    return out


def _yolo_rows(layout: Layout, out: np.ndarray) -> np.ndarray:
    """The YOLO output of one sample as (anchors, K)."""
    a = np.asarray(out, dtype=np.float64)
    a = a.reshape([d for d in a.shape if d != 1]) if a.ndim != 2 else a
    return a.T if layout.transposed else a


def _yolox_grid(anchors: int, image_size) -> tuple[np.ndarray, np.ndarray]:
    h, w = image_size
    grids, strides = [], []
    for s in (8, 16, 32):
        gh, gw = h // s, w // s
        yy, xx = np.mgrid[0:gh, 0:gw]
        grids.append(np.stack([xx.ravel(), yy.ravel()], 1))
        strides.append(np.full(gh * gw, s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    if len(grid) != anchors:
        raise InputError(f"decoder 'yolox': {anchors} anchors do not match the strides 8, 16, 32 of a {w}x{h} input "
                         f"({len(grid)} cells); if the model decodes its boxes itself, use decoder yolov5")
    return grid.astype(np.float64), stride.astype(np.float64)


def candidates(layout: Layout, outputs: dict, image_size) -> tuple:
    """Every anchor/query of one sample: boxes (A, 4) x1y1x2y2 in pixels, class scores
    (A, C), objectness (A,) or None, and the score (A, C) a detection is ranked by."""
    h, w = image_size
    if layout.kind == "nms":  # one score per row: its class's
        rows = np.asarray(outputs[layout.scores], dtype=np.float64).reshape(-1, 6)
        return rows[:, :4], rows[:, 4:5], None, rows[:, 4:5]
    if layout.kind in ("yolov8", "yolov5", "yolox"):
        rows = _yolo_rows(layout, outputs[layout.scores])
        xywh = rows[:, :4].copy()
        if layout.kind == "yolox":
            grid, stride = _yolox_grid(len(rows), image_size)
            xywh[:, :2] = (xywh[:, :2] + grid) * stride[:, None]
            xywh[:, 2:] = np.exp(xywh[:, 2:]) * stride[:, None]
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        if layout.has_objectness:
            obj, cls = rows[:, 4], rows[:, 5:]
            return boxes, cls, obj, obj[:, None] * cls
        return boxes, rows[:, 4:], None, rows[:, 4:]
    boxes = np.asarray(outputs[layout.boxes], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(outputs[layout.scores], dtype=np.float64)
    scores = scores.reshape(len(boxes), -1)
    if layout.kind == "detr":
        z = np.exp(scores - scores.max(1, keepdims=True))
        prob = (z / z.sum(1, keepdims=True))[:, :-1]
        cx, cy, bw, bh = boxes.T
        boxes = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1)
        return boxes, prob, None, prob
    if layout.kind == "rtdetr":
        prob = 0.5 * (1.0 + np.tanh(0.5 * scores))  # the sigmoid, without overflow
        cx, cy, bw, bh = boxes.T
        boxes = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1)
        return boxes, prob, None, prob
    if np.abs(boxes).max(initial=0.0) <= 1.5:  # normalised corners
        boxes = boxes * np.array([w, h, w, h], dtype=np.float64)
    if scores.shape[1] > 1 and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        # A softmax over the classes of every anchor includes a background class (column 0,
        # as torchvision's and TensorFlow's SSDs): it is never a detection.
        scores = scores.copy()
        scores[:, 0] = 0.0
    return boxes, scores, None, scores


def iou(box, boxes) -> np.ndarray:
    """IoU of one box (x1, y1, x2, y2) with each of boxes (M, 4)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(box, dtype=np.float64)
    ix = np.clip(np.minimum(b[2], boxes[:, 2]) - np.maximum(b[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(b[3], boxes[:, 3]) - np.maximum(b[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = lambda r: np.clip(r[..., 2] - r[..., 0], 0, None) * np.clip(r[..., 3] - r[..., 1], 0, None)  # noqa: E731
    union = area(b) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes, scores, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, highest score first."""
    order = list(np.argsort(-np.asarray(scores), kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if order:
            rest = np.asarray(order)
            order = list(rest[iou(boxes[i], boxes[rest]) <= iou_threshold])
    return keep


def decode(layout: Layout, outputs: dict, image_size, score_threshold: float = SCORE_THRESHOLD,
           iou_threshold: float = IOU_THRESHOLD, max_detections: int = MAX_DETECTIONS) -> list[Detection]:
    """The detections of one sample (outputs: name -> that sample's array), best first:
    each anchor's best class above the threshold, then NMS per class (not for DETR); for
    RT-DETR every (query, class) above the threshold, without NMS."""
    boxes, cls, obj, score = candidates(layout, outputs, image_size)
    if layout.kind == "rtdetr":
        q, c = np.nonzero(score >= score_threshold)
        order = np.lexsort((c, q, -score[q, c]))[:max_detections]
        return [Detection(tuple(float(v) for v in boxes[q[k]]), int(c[k]), float(score[q[k], c[k]]), int(q[k]),
                          cls[q[k]].copy()) for k in order]
    if layout.kind == "nms":
        labels = np.asarray(outputs[layout.scores], dtype=np.float64).reshape(-1, 6)[:, 5]
        keep = [int(i) for i in np.argsort(-score[:, 0], kind="stable") if score[i, 0] >= score_threshold]
        return [Detection(tuple(float(v) for v in boxes[i]), int(round(labels[i])), float(score[i, 0]), i,
                          cls[i].copy()) for i in keep[:max_detections]]
    best = score.argmax(1)
    top = score[np.arange(len(score)), best]
    idx = np.flatnonzero(top >= score_threshold)
    kept = []
    if layout.kind == "detr":
        kept = list(idx[np.argsort(-top[idx], kind="stable")])
    else:
        for c in np.unique(best[idx]):
            members = idx[best[idx] == c]
            kept += [int(members[k]) for k in nms(boxes[members], top[members], iou_threshold)]
        kept.sort(key=lambda i: (-top[i], i))
    return [Detection(tuple(float(v) for v in boxes[i]), int(best[i]), float(top[i]), int(i), cls[i].copy(),
                      None if obj is None else float(obj[i])) for i in kept[:max_detections]]


def seed(layout: Layout, det: Detection, outputs: dict) -> np.ndarray:
    """The seed (shaped like one sample's scores output) whose product with that output is
    the detection's score, to first order: a one-hot of the class score (YOLOv8, SSD) or
    logit (DETR: its probability is a softmax of all its logits); for objectness x class,
    the score's derivative (class score at the objectness, objectness at the class score),
    so gradients are exactly those of the product."""
    out = np.asarray(outputs[layout.scores])
    s = np.zeros(out.shape, np.float32)
    if layout.kind == "nms":
        s.reshape(-1, 6)[det.index, 4] = 1.0
        return s
    if layout.kind in ("yolov8", "yolov5", "yolox"):
        rows = np.zeros(_yolo_rows(layout, out).shape, np.float32)
        if layout.has_objectness:
            rows[det.index, 4] = det.class_scores[det.cls]
            rows[det.index, 5 + det.cls] = det.objectness
        else:
            rows[det.index, 4 + det.cls] = 1.0
        rows = rows.T if layout.transposed else rows
        return np.ascontiguousarray(rows.reshape(out.shape))
    rows = np.asarray(outputs[layout.boxes]).size // 4
    s.reshape(rows, -1)[det.index, det.cls] = 1.0
    return s


def explained_score(layout: Layout) -> str:
    """What the seed explains, for the record and the CLI."""
    if layout.has_objectness:
        return ("objectness x class score, linearised at the input: the seed is its derivative (class score at the "
                "objectness, objectness at the class score), so gradients are the product's; relevance methods "
                "start from seed . output = 2 x score")
    if layout.kind == "detr":
        return "the class logit (the detection's score is the softmax of the query's logits)"
    if layout.kind == "rtdetr":
        return "the class logit (the detection's score is its sigmoid)"
    if layout.kind == "nms":
        return "the score the graph's NMS kept (gradients through NMS are those of the selected score)"
    return "the class score"


def match(detections: list[Detection], box, cls: int | None = None) -> int:
    """The index (into detections) of the detection best matching `box` by IoU, among
    those of class `cls` where given."""
    pool = [i for i, d in enumerate(detections) if cls is None or d.cls == cls]
    if not pool:
        raise InputError(f"no detection{'' if cls is None else f' of class {cls}'} to match the box "
                         f"{tuple(box)} (--list-detections shows them)")
    ious = iou(box, np.array([detections[i].box for i in pool]))
    j = int(np.argmax(ious))
    if ious[j] <= 0:
        raise InputError(f"no detection overlaps the box {tuple(box)} (--list-detections shows them)")
    return pool[j]


def format_detections(detections: list[Detection], labels=None) -> list[str]:
    lines = []
    for i, d in enumerate(detections):
        name = f" ({labels[d.cls]})" if labels and 0 <= d.cls < len(labels) else ""
        box = ",".join(f"{v:.1f}" for v in d.box)
        obj = "" if d.objectness is None else f" objectness {d.objectness:.3f}"
        lines.append(f"detection:{i}  class {d.cls}{name}  score {d.score:.3f}{obj}  box {box}  index {d.index}")
    return lines


def image_size(shape) -> tuple[int, int]:
    """(H, W) of a batch-first image input (NCHW or NHWC)."""
    from .methods.blackbox import layout as input_layout

    _, spatial = input_layout(tuple(shape))
    if len(spatial) < 2:
        raise InputError(f"a detector takes images (N, C, H, W) or (N, H, W, C); the input has shape {tuple(shape)}")
    return tuple(int(shape[a]) for a in spatial[-2:])


def from_seed(layout: Layout, seed_sample: np.ndarray) -> tuple[int, int]:
    """(raw index, class) of the one detection a seed (one sample, shaped like the scores
    output) explains, as `seed` forms it."""
    s = np.asarray(seed_sample)
    if layout.kind in ("yolov8", "yolov5", "yolox"):
        rows = _yolo_rows(layout, s)
        first = 5 if layout.has_objectness else 4
        hits = np.argwhere(rows[:, first:] != 0)
        anchors = np.unique(np.argwhere(rows != 0)[:, 0])
    elif layout.kind == "nms":
        rows = s.reshape(-1, 6)
        hits = np.argwhere(rows[:, 4:5] != 0)
        anchors = np.unique(np.argwhere(rows != 0)[:, 0])
    else:
        rows = s.reshape(-1, s.shape[-1])
        hits = np.argwhere(rows != 0)
        anchors = np.unique(hits[:, 0])
    if len(hits) != 1 or len(anchors) != 1:
        raise OptionError(f"the seed explains {len(hits)} class score(s) of the {layout.kind} output "
                          f"'{layout.scores}', not one detection: give target detection:I or box:x1,y1,x2,y2[:C]")
    return int(hits[0][0]), int(hits[0][1])


def cli_target(explainer, x, target, decoder=None, listing=False, echo=print, labels=None):
    """The CLI's detection handling: `--decoder` applied to a detection target, the
    detections printed with `--list-detections`, and the target resolved (one forward
    pass). Returns the target to explain, or None where only the list was asked for."""
    from .target import _Detect

    if decoder is not None and not isinstance(target, _Detect) and not listing:
        raise OptionError("--decoder reads a detector's outputs for a detection target: give -t detection:I or "
                          "-t box:x1,y1,x2,y2[:C] (or --list-detections)")
    if not isinstance(target, _Detect) and not listing:
        return target
    t = target.with_decoder(decoder) if isinstance(target, _Detect) else _Detect("detection:0", index=0,
                                                                                  decoder=decoder)
    feeds = explainer.feeds(x)
    if listing:
        layout, found, _outs, _size = t.detections(explainer, feeds)
        echo(f"decoded as {layout.describe()}, score threshold {t.score_threshold}, NMS IoU {t.iou_threshold}")
        for i, dets in enumerate(found):
            echo(f"sample {i}: {len(dets)} detection(s)")
            for line in format_detections(dets, labels):
                echo("  " + line)
        if not isinstance(target, _Detect):
            return None
    return t.resolve(explainer, feeds)


def anchor_grid(layout: Layout, anchors: int, index: int, image_size) -> tuple[int, int] | None:
    """(grid height, grid width) of the scale whose cells hold anchor `index` of a YOLO-style
    output, its anchors laid out scale by scale (strides 8, 16, 32[, 64], 1 or 3 anchors a
    cell; or one scale of any stride); None where no such layout counts `anchors`."""
    if layout.kind not in ("yolov8", "yolov5", "yolox"):
        return None
    h, w = image_size
    layouts = [(8, 16, 32), (8, 16, 32, 64)] + [(s,) for s in (4, 8, 16, 32, 64)]
    for strides in layouts:
        for per_cell in (1, 3):
            sizes = [(-(-h // s), -(-w // s)) for s in strides]
            blocks = [per_cell * gh * gw for gh, gw in sizes]
            if sum(blocks) == anchors:
                start = 0
                for size, block in zip(sizes, blocks):
                    if index < start + block:
                        return size
                    start += block
    return None


def cam_layer(graph, explained: str, grid) -> str | None:
    """The feature map at a detection's scale: among the float (N, C, gh, gw) tensors the
    explained output depends on, the last one several Convs read (a neck output feeding the
    box and class branches), else the last one a Conv reads."""
    if grid is None:
        return None
    from .compile import _ancestors

    need = _ancestors(graph, explained)  # through If/Loop bodies' reads too
    at_scale = []
    for node in graph.nodes:
        for o in node.output:
            shape = graph.shape(o) or ()
            if o in need and graph.is_float(o) and len(shape) == 4 and tuple(shape[2:]) == tuple(grid):
                at_scale.append(o)
    convs_reading = lambda t: [n for n in graph.consumers.get(t, []) if n.op_type == "Conv"]  # noqa: E731
    shared = [t for t in at_scale if len(convs_reading(t)) > 1]
    convs = [t for t in at_scale if any(n.op_type == "Conv" for n in graph.consumers.get(t, []))]
    return (shared or convs or [None])[-1]


def default_cam_layer(explainer, feeds, target) -> str | None:
    """The CAM layer of a resolved detection target: the feature map of the scale whose
    anchor produced the samples' detections; None where it cannot be told (or they differ)."""
    layout = target.layout
    graph = explainer.plan(feeds).graph
    if layout.kind == "nms":
        return _nms_cam_layer(explainer, feeds, graph, target)
    shape = graph.shape(layout.scores)
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        return None
    per_anchor = layout.classes + (5 if layout.has_objectness else 4)
    anchors = int(np.prod([d for i, d in enumerate(shape) if i != (explainer.plan(feeds).axis(layout.scores) or 0)]))
    grids = {anchor_grid(layout, anchors // per_anchor, d.index, target.image_size) for d in target.chosen}
    if len(grids) != 1:  # samples at different scales: one layer cannot serve them
        return None
    return cam_layer(graph, layout.scores, grids.pop())


def _nms_cam_layer(explainer, feeds, graph, target) -> str:
    """The CAM layer for rows an in-graph NonMaxSuppression selected: the anchor of each
    chosen row is the NMS candidate box equal to the row's box (read off the NMS's boxes
    input), and its scale's feature map is the layer."""
    from .compile import _ancestors

    need = _ancestors(graph, target.layout.scores)
    nms = [n for n in graph.nodes if n.op_type == "NonMaxSuppression" and any(o in need for o in n.output)]
    if len(nms) != 1:
        raise OptionError(f"Grad-CAM on rows selected by NMS needs one NonMaxSuppression node before "
                          f"'{target.layout.scores}' to find the detection's anchor; found {len(nms)}: give layer=")
    node = nms[0]
    centre = next((a.i for a in node.attribute if a.name == "center_point_box"), 0) == 1
    cand = np.asarray(explainer._forward(feeds, [node.input[0]])[node.input[0]], dtype=np.float64)
    grids = set()
    for i, d in enumerate(target.chosen):
        b = cand[i].reshape(-1, 4)
        if centre:  # cx, cy, w, h
            corners = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)
        else:  # y1, x1, y2, x2 (either corner order)
            corners = np.stack([np.minimum(b[:, 1], b[:, 3]), np.minimum(b[:, 0], b[:, 2]),
                                np.maximum(b[:, 1], b[:, 3]), np.maximum(b[:, 0], b[:, 2])], 1)
        anchor = int(np.argmax(iou(d.box, corners)))
        grids.add(anchor_grid(Layout("yolov8", "", "", 1, True), len(corners), anchor, target.image_size))
    if len(grids) != 1 or None in grids:
        why = " (samples at different scales)" if len(grids) > 1 else ""
        raise OptionError(f"Grad-CAM on rows selected by NMS: the scale of the detection's anchor cannot be told from "
                          f"the NMS's {cand[0].size // 4} candidate boxes{why}: give layer=")
    layer = cam_layer(graph, target.layout.scores, grids.pop())
    if layer is None:
        raise OptionError("Grad-CAM on rows selected by NMS: no feature map at the detection's scale feeds the "
                          "output: give layer=")
    return layer


def target(index: int | None = None, box=None, cls: int | None = None, decoder: str | None = None,
           score_threshold: float = SCORE_THRESHOLD, iou_threshold: float = IOU_THRESHOLD):
    """A detection target with the decoding settings spelled out (Python `target=`): the
    `index`-th detection by score, or the one best matching `box` (of class `cls`)."""
    from .target import _Detect

    if (index is None) == (box is None):
        raise OptionError("give a detection's index or a box (x1, y1, x2, y2), not both and not neither")
    if decoder is not None and decoder.lower() not in LAYOUTS:
        raise OptionError(f"unknown decoder '{decoder}'; choose from {', '.join(LAYOUTS)}")
    decoder = None if decoder is None else decoder.lower()
    suffix = (f"@{decoder}" if decoder else "") + (
        "" if (score_threshold, iou_threshold) == (SCORE_THRESHOLD, IOU_THRESHOLD)
        else f";score>={score_threshold:g};iou<={iou_threshold:g}")
    if index is not None:
        return _Detect(f"detection:{int(index)}{suffix}", index=int(index), decoder=decoder,
                       score_threshold=score_threshold, iou_threshold=iou_threshold)
    box = tuple(float(v) for v in box)
    text = "box:" + ",".join(f"{v:g}" for v in box) + ("" if cls is None else f":{int(cls)}") + suffix
    return _Detect(text, box=box, cls=cls, decoder=decoder, score_threshold=score_threshold,
                   iou_threshold=iou_threshold)


def detections(explainer, x, decoder: str | None = None, score_threshold: float = SCORE_THRESHOLD,
               iou_threshold: float = IOU_THRESHOLD) -> list[list[Detection]]:
    """Every sample's detections, best first, decoded as `detection:I` targets decode them
    (one forward pass); `detection:I` explains detections(...)[sample][I]."""
    t = target(index=0, decoder=decoder, score_threshold=score_threshold, iou_threshold=iou_threshold)
    return t.detections(explainer, explainer.feeds(x))[1]


# Methods that run the model only on the explained inputs themselves (one forward and one
# backward pass), plus D-RISE, which matches the boxes of every masked image by IoU.
_ONE_PASS = {"gradient", "saliency", "sensitivity", "input_x_gradient", "guided_backprop", "deconvnet", "cam",
             "grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "guided_grad_cam", "deep_taylor",
             "excitation_backprop", "contrastive_excitation_backprop", "d_rise"}


def check_selection(graph, explained: str, method: str | None, who: str | None = None) -> None:
    """Refuse a method (or, with `who`, what `who` names: a metric) that runs a model whose
    explained output a NonMaxSuppression selects on inputs other than the explained ones (a
    path, noise samples, masks, a reference). NMS picks its rows anew on every input, so row
    k of a scaled or masked image need not be the detection row k is on the explained image,
    and the method would mix the scores of different detections. At the explained inputs
    the selection is piecewise constant: single-pass methods differentiate through the
    Gathers at the selected indices."""
    if method is not None and (method in _ONE_PASS or method.startswith("lrp")):
        return
    from .compile import _ancestors

    need = _ancestors(graph, explained)
    nms = [n for n in graph.nodes if n.op_type == "NonMaxSuppression" and any(o in need for o in n.output)]
    if nms:
        raise OptionError(
            f"{who or f'method {method!r}'} runs the model on other inputs than the explained ones, and the explained "
            f"output '{explained}' is selected by NonMaxSuppression ('{nms[0].name or nms[0].output[0]}') in the "
            "graph: its rows are chosen anew on each of those inputs, so a row need not hold the same detection. Use "
            "d_rise (it matches boxes), a single-pass method (gradient, input_x_gradient, an lrp.* composite, "
            "grad_cam, excitation_backprop) and the energy_in_box and pointing_game metrics, or explain the "
            "detector's raw output before the NMS")
