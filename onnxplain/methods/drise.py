"""D-RISE: detector randomized input sampling for explanation (Petsiuk et al., CVPR 2021).

The explained detection is a vector d_t = (box L_t, class scores P_t). Each random mask M_i
(RISE's smooth masks, `rise.MaskSampler`) gives a masked image M_i * I (or a blend towards
`baseline`); the detector's proposals on it, D_j = (L_j, O_j, P_j), are decoded as the user's
decoder reads them (`onnxplain.detection`), and the mask's weight is the best match,

    w_i = max_j IoU(L_t, L_j) * cos(P_t, P_j) * O_j      (O_j = 1 where the layout has no objectness)

A detector that runs NMS inside its graph (`decoder=nms`: rows x1, y1, x2, y2, score,
class) has no class-score vectors: there the similarity is IoU x [same class] x score_j.
The saliency is sum_i w_i M_i / n_masks (with `center`, sum_i (w_i - mean_i w_i) M_i / n_masks:
a pixel whose masking does not change the weights then scores about 0, so the map's positive
part shows what the detection needs). The proposals are every anchor or query before the
score threshold and NMS (`proposals="all"`, as the paper scores a detector's proposals), or
the detections after them (`proposals="detections"`). The target is the detection the seed
explains (target `detection:I` or `box:...`): its anchor and class are read off the seed.
"""

from __future__ import annotations

import numpy as np

from .. import detection as D
from ..errors import InputError, OptionError
from .base import Option, positive, register
from .blackbox import baselines, float_inputs, sample_feeds, spread
from .rise import MaskSampler

OPTIONS = [
    Option("n_masks", 1000, int, "number of random masks", check=positive),
    Option("cells", 16, int, "grid cells per spatial side of the low-resolution masks (the paper's 16)",
           check=positive),
    Option("p_keep", 0.5, float, "probability that a cell is kept",
           check=lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]"),
    Option("baseline", 0.0, "array", "value the masked-out parts fade to: a number, per-channel values, or an array"),
    Option("seed", 0, int, "random seed of the masks"),
    Option("center", False, bool, "subtract the mean weight from every mask's weight, so a pixel that does not "
           "change the detection scores 0 (the paper's map, sum_i w_i M_i / n_masks, is positive everywhere)"),
    Option("decoder", "auto", str, "detector output layout: auto (read off the output shapes) or a layout",
           choices=("auto",) + D.LAYOUTS),
    Option("proposals", "all", str, "which detections of a masked image are matched: all (every anchor/query) "
           "or detections (after the score threshold and NMS)", choices=("all", "detections")),
]


def similarity(box, class_scores, boxes, scores, objectness=None) -> np.ndarray:
    """IoU(box, boxes_j) * cos(class_scores, scores_j) * objectness_j for each proposal j."""
    p = np.asarray(class_scores, dtype=np.float64)
    q = np.asarray(scores, dtype=np.float64)
    norms = np.linalg.norm(q, axis=1) * np.linalg.norm(p)
    cos = np.where(norms > 0, q @ p / np.where(norms > 0, norms, 1), 0.0)
    s = D.iou(box, boxes) * cos
    return s if objectness is None else s * np.asarray(objectness, dtype=np.float64)


@register("d_rise", "D-RISE: random masks weighted by how well the masked image's detections match the "
          "explained box and class (Petsiuk et al. 2021)", options=OPTIONS,
          reference="Petsiuk et al. 2021", kind="black-box")
def d_rise(ctx, n_masks, cells, p_keep, baseline, seed, center, decoder, proposals):
    names = float_inputs(ctx, integers=False)
    base = baselines(ctx, baseline, names)
    k = names[0]
    x = ctx.feeds[k]
    n = ctx.n
    outs = [o for o in ctx.graph.outputs if ctx.graph.is_float(o)]
    original = ctx.forward(outs)
    layout = _layout(ctx, {o: v.shape[1:] for o, v in original.items()}, decoder)
    size = D.image_size(x.shape)
    # The explained detection of each sample, from its seed and the original outputs.
    targets = []
    for s in range(n):
        index, _cls = D.from_seed(layout, ctx.seed[s])
        sample = {o: v[s] for o, v in original.items()}
        boxes, scores, _obj, _rank = D.candidates(layout, sample, size)
        if layout.kind == "nms":  # (score, class label) of the selected row
            label = np.asarray(sample[layout.scores], dtype=np.float64).reshape(-1, 6)[index, 5]
            targets.append((boxes[index], np.array([scores[index, 0], label])))
        else:
            targets.append((boxes[index], scores[index]))
    rng = np.random.default_rng(seed)
    sampler = MaskSampler(x.shape, n_masks, cells, p_keep, rng)
    saliency = np.zeros((n,) + sampler.dims, dtype=np.float64)
    total = n_masks * n
    sess = ctx.forward_session(outs)
    chunk = {}
    weights = np.zeros((n, n_masks))
    masks_sum = np.zeros_like(saliency)

    def feeds(start, stop):
        r = np.arange(start, stop)
        samples = r % n
        m = chunk["masks"] = sampler.masks(r // n)
        if sampler.channel is not None:
            m = np.expand_dims(m, sampler.channel)
        b = base[k][samples]
        return sample_feeds(ctx, samples, {k: (b + m * (x[samples] - b)).astype(x.dtype)})

    for start, stop, out in sess.run_rows(total, feeds, outs, label=f"d_rise on {k}"):
        for j, r in enumerate(range(start, stop)):
            s = r % n
            row = {o: v[j] for o, v in out.items()}
            w = mask_weight(layout, row, size, targets[s], proposals)
            saliency[s] += w * chunk["masks"][j]
            masks_sum[s] += chunk["masks"][j]
            weights[s, r // n] = w
    if center:  # sum_i (w_i - mean w) M_i
        saliency -= weights.mean(axis=1).reshape((n,) + (1,) * len(sampler.dims)) * masks_sum
    saliency /= n_masks
    return {k: spread(saliency, x.shape, sampler.channel)}


def _layout(ctx, shapes, decoder):
    """The layout named, or read off the shapes; a (K, 6) output is also tried as rows
    selected by NMS in the graph, where the seed (a score column alone) says so."""
    if decoder != "auto":
        return D.find_layout(shapes, decoder)
    first = D.find_layout(shapes)
    try:
        for s in range(ctx.n):
            D.from_seed(first, ctx.seed[s])
        return first
    except OptionError:
        try:
            nms = D.find_layout(shapes, "nms")
            for s in range(ctx.n):
                D.from_seed(nms, ctx.seed[s])
            return nms
        except (OptionError, InputError):
            pass
        raise


def mask_weight(layout, outputs, size, target, proposals="all") -> float:
    """max_j of the similarity of the target (box, class scores) to one masked image's
    proposals (0 where it has none)."""
    box, class_scores = target
    if layout.kind == "nms":  # selected in the graph: a class label and its score per row
        rows = np.asarray(outputs[layout.scores], dtype=np.float64).reshape(-1, 6)
        same = np.round(rows[:, 5]) == round(float(class_scores[1]))
        s = D.iou(box, rows[:, :4]) * same * rows[:, 4]
        return float(s.max(initial=0.0))
    if proposals == "all":
        boxes, scores, obj, _rank = D.candidates(layout, outputs, size)
    else:
        dets = D.decode(layout, outputs, size)
        if not dets:
            return 0.0
        boxes = np.array([d.box for d in dets])
        scores = np.array([d.class_scores for d in dets])
        obj = None if dets[0].objectness is None else np.array([d.objectness for d in dets])
    if len(boxes) == 0:
        return 0.0
    return float(np.max(similarity(box, class_scores, boxes, scores, obj)))
