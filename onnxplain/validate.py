"""Did a converted, optimised or quantized model keep its reasons? And does a model look
where it should?

`compare` puts a reference model and a candidate side by side on the same inputs:
predictions (top-1 agreement, largest probability difference) and explanations of the
same class (Spearman rank correlation of |relevance| per position, overlap of the top-k
positions, intersection over union of the most relevant regions). `check` tests one
model's explanations against expectations such as "at least 50% of the relevance lies in
this box". `verdict` holds the numbers against thresholds: the basis of a CI gate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import InputError, OptionError, UnsupportedOperatorError
from .metrics import Positions, spearman

# Every per-sample threshold must hold for every input; top-1 agreement is over the set.
THRESHOLDS = {"min_rank_corr": 0.8, "min_topk_overlap": 0.6, "min_iou": 0.5, "min_top1_agreement": 1.0,
              "max_prob_diff": None, "min_gradient_rank_corr": None, "min_input_x_gradient_rank_corr": None}
# What each threshold is checked on, and in which direction.
CHECKS = {"min_rank_corr": ("rank_corr", min), "min_topk_overlap": ("topk_overlap", min),
          "min_iou": ("iou", min), "max_prob_diff": ("prob_diff", max),
          "min_gradient_rank_corr": ("gradient_rank_corr", min),
          "min_input_x_gradient_rank_corr": ("input_x_gradient_rank_corr", min)}
# White-box numbers compare, whatever the method, when both models have gradient rules:
# the rank correlation of the signed gradients and of input x gradient per sample.
WHITE_BOX = ("gradient", "input_x_gradient")
FALLBACK = "feature_ablation"  # a black-box method every model that runs can be explained with


def load_thresholds(path=None, **given) -> dict:
    """The defaults, updated by a JSON file, updated by the values given (None: not given)."""
    out = dict(THRESHOLDS)
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise InputError(f"cannot read thresholds file {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise InputError(f"thresholds file {path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"thresholds file {path} must hold a JSON object such as {{\"min_rank_corr\": 0.8}}")
        out.update(data)
    out.update({k: v for k, v in given.items() if v is not None})
    unknown = sorted(set(out) - set(THRESHOLDS))
    if unknown:
        raise OptionError(f"unknown threshold(s) {', '.join(unknown)}; known: {', '.join(THRESHOLDS)}")
    for k, v in out.items():
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise OptionError(f"threshold {k} must be a number, got {v!r}")
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _logits(explainer, x) -> np.ndarray:
    t = explainer.explained_tensor()
    if hasattr(explainer, "forward"):
        out = explainer.forward(x, [t])[t]
    else:
        out = explainer._forward(explainer._feeds(x), [t])[t]
    out = np.asarray(out, dtype=np.float64)
    return out.reshape(len(out), -1)


def _white_box(explainers) -> bool:
    from .compile import unsupported
    from .methods.gradients import GRADIENT

    return all(not unsupported(e.graph, GRADIENT, e.float_inputs, e.explained_tensor()) for e in explainers)


def quantized_note(explainers) -> str | None:
    """The straight-through convention, stated where a quantized model is explained white-box."""
    from .rules.quantized import CONVENTION, has_quantized

    return CONVENTION if any(has_quantized(e.graph) for e in explainers) else None


def saturated(explainer, x, classes):
    """Per sample, whether the explained class's score is a quantized value at a limit of its
    integer range (the model's output is DequantizeLinear of it); None where it is not."""
    from .rules.quantized import QRANGE

    t = explainer.explained_tensor()
    node = explainer.graph.producer.get(t)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    q = node.input[0]
    qtype = explainer.graph.elem_type(node.input[2]) if len(node.input) > 2 and node.input[2] else \
        explainer.graph.elem_type(q)
    if qtype not in QRANGE:
        return None
    lo, hi = QRANGE[qtype]
    forward = explainer.forward if hasattr(explainer, "forward") else None
    values = forward(x, [q])[q] if forward else explainer._forward(explainer._feeds(x), [q])[q]
    values = np.asarray(values).reshape(len(values), -1)
    return [bool(values[i, int(c)] in (lo, hi)) for i, c in enumerate(classes)]


def zero_gradient_note(explainer, x, classes, gradients, names) -> str | None:
    """For a quantized model, why some inputs' gradients are all zero: the explained score
    saturated at its integer limit, or values clipped to their ranges inside the model (the
    straight-through gradient is 0 there); None where no gradient is zero or the model is
    not quantized."""
    if not quantized_note((explainer,)):
        return None
    zero = [i for i, row in enumerate(np.asarray(gradients).reshape(len(gradients), -1)) if not np.any(row)]
    if not zero:
        return None
    flags = saturated(explainer, x, classes) or [False] * len(names)
    top = [names[i] for i in zero if flags[i]]
    inner = [names[i] for i in zero if not flags[i]]
    parts = []
    if top:
        parts.append(f"explained score is saturated at its quantization limit for {', '.join(top)}")
    if inner:
        parts.append(f"gradient is 0 for {', '.join(inner)}: every path is clipped to a quantization range")
    return "; ".join(parts) + " (values clipped to their integer range pass no gradient: calibrate the model " \
        "on data like these inputs)"


def _signed(explainer, x, method, classes) -> np.ndarray:
    a = explainer.attribute(x, method=method, target=[int(c) for c in classes])
    if isinstance(a, dict):
        raise InputError("validate needs a model with one float input")
    return np.asarray(a, dtype=np.float64).reshape(len(a), -1)


def choose_method(method: str, explainers) -> tuple[str, str | None]:
    """`method`, or for 'auto' the gradient when every model has its rules, else a
    black-box method; and a note saying why when it fell back."""
    if method != "auto":
        return method, None
    from .compile import unsupported
    from .methods.gradients import GRADIENT

    missing = set()
    for e in explainers:
        missing |= set(unsupported(e.graph, GRADIENT, e.float_inputs, e.explained_tensor()))
    if not missing:
        return "gradient", None
    return FALLBACK, f"gradient has no rule for {', '.join(sorted(missing))}; using {FALLBACK}"


def _maps(explainer, x, method, classes, options) -> np.ndarray:
    try:
        a = explainer.attribute(x, method=method, target=[int(c) for c in classes], **(options or {}))
    except UnsupportedOperatorError as exc:
        raise UnsupportedOperatorError(exc.operators, method) from None
    if isinstance(a, dict):
        raise InputError("validate needs a model with one float input")
    pos = Positions(np.shape(a))
    return np.abs(pos.relevance(a)).reshape((len(a),) + pos.grid)


def _smooth(m: np.ndarray) -> np.ndarray:
    """Regions, not single pixels: a light blur of image maps before thresholding."""
    if m.ndim < 2:
        return m
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(m, max(1.0, min(m.shape) / 56.0), mode="nearest")


def explanation_agreement(a: np.ndarray, b: np.ndarray, topk: float = 0.1, region: float = 0.5) -> dict:
    """Rank correlation, top-k overlap and region IoU of two |relevance| maps of one sample.

    topk: the fraction of positions counted as the top. region: a position belongs to the
    most relevant region where the smoothed map reaches `region` x its maximum."""
    if not 0 < topk <= 1:
        raise OptionError(f"topk must be a fraction in (0, 1], got {topk}")
    fa, fb = a.reshape(-1), b.reshape(-1)
    k = max(1, int(math.ceil(topk * fa.size)))
    top_a = set(np.argsort(-fa, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-fb, kind="stable")[:k].tolist())
    sa, sb = _smooth(a), _smooth(b)
    ra, rb = sa >= region * sa.max(), sb >= region * sb.max()
    union = np.logical_or(ra, rb).sum()
    return {"rank_corr": spearman(fa, fb), "topk_overlap": len(top_a & top_b) / k,
            "iou": float(np.logical_and(ra, rb).sum() / union) if union else 1.0}


def compare(reference, candidate, x, method: str = "auto", target=None, topk: float = 0.1, region: float = 0.5,
            options: dict | None = None, names=None) -> tuple[list[dict], str, str | None]:
    """Per-sample records comparing two models on x; the method used; a note.

    Both models explain the same class: `target`, else the reference's prediction.
    """
    method, note = choose_method(method, (reference, candidate))
    lr, lc = _logits(reference, x), _logits(candidate, x)
    if lr.shape != lc.shape:
        raise InputError(f"the models' outputs differ in shape: {lr.shape} and {lc.shape}")
    pr, pc = _softmax(lr), _softmax(lc)
    n = len(lr)
    classes = lr.argmax(axis=1) if target is None else np.broadcast_to(np.asarray(target).reshape(-1), (n,))
    ma, mb = _maps(reference, x, method, classes, options), _maps(candidate, x, method, classes, options)
    white = {}
    if _white_box((reference, candidate)):
        for wm in WHITE_BOX:
            white[wm] = (_signed(reference, x, wm, classes), _signed(candidate, x, wm, classes))
        qnote = quantized_note((reference, candidate))
        if qnote:
            note = f"{note}; {qnote}" if note else qnote
        names = names or [str(i) for i in range(n)]
        for side, e, grads in (("reference", reference, white["gradient"][0]),
                               ("candidate", candidate, white["gradient"][1])):
            why = zero_gradient_note(e, x, classes, grads, names)
            if why:
                note = f"{note}; the {side}'s {why}"
    names = names or [str(i) for i in range(n)]
    records = []
    for i in range(n):
        r = {"sample": names[i], "target": int(classes[i]),
             "reference_top1": int(lr[i].argmax()), "candidate_top1": int(lc[i].argmax()),
             "top1_agree": bool(lr[i].argmax() == lc[i].argmax()),
             "reference_score": float(lr[i, int(classes[i])]), "candidate_score": float(lc[i, int(classes[i])]),
             "prob_diff": float(np.abs(pr[i] - pc[i]).max())}
        r.update(explanation_agreement(ma[i], mb[i], topk, region))
        for wm, (ga, gb) in white.items():
            r[f"{wm}_rank_corr"] = spearman(ga[i], gb[i])
        records.append(r)
    return records, method, note


def verdict(records: list[dict], thresholds: dict) -> dict:
    """Summary (mean and worst of each number), failures, and whether all thresholds hold."""
    failures = []
    for name, limit in thresholds.items():
        if limit is None or name not in CHECKS:
            continue
        key, worst = CHECKS[name]
        if any(key not in r for r in records):
            failures.append({"threshold": name, "limit": limit, "worst": None,
                             "inputs": [r["sample"] for r in records if key not in r],
                             "reason": "no white-box comparison: a model has no gradient rules"})
            continue
        bad = [r["sample"] for r in records if (r[key] < limit if worst is min else r[key] > limit)]
        if bad:
            failures.append({"threshold": name, "limit": limit, "inputs": bad,
                             "worst": worst(r[key] for r in records)})
    agreement = float(np.mean([r["top1_agree"] for r in records])) if records else 1.0
    limit = thresholds.get("min_top1_agreement")
    if limit is not None and agreement < limit:
        failures.append({"threshold": "min_top1_agreement", "limit": limit, "worst": agreement,
                         "inputs": [r["sample"] for r in records if not r["top1_agree"]]})
    summary = {"inputs": len(records), "top1_agreement": agreement}
    for key, worst in CHECKS.values():
        values = [r[key] for r in records if key in r]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "worst": float(worst(values))}
    return {"passed": not failures, "summary": summary, "failures": failures}


# ----------------------------------------------------------------------------- expectations


def parse_expectation(text: str) -> dict:
    """'region=x1,y1,x2,y2;min_share=0.5' (pixels of the model input, x2/y2 exclusive) or
    'features=0,3,4;min_share=0.5' for tabular inputs; optional 'input=NAME' and 'target=K'."""
    out = {}
    for part in str(text).replace("\n", ";").split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise OptionError(f"expectation part '{part}' is not KEY=VALUE (e.g. region=10,10,100,100;min_share=0.5)")
        try:
            if key in ("region", "features"):
                out[key] = [int(v) for v in value.split(",")]
            elif key in ("min_share", "max_share"):
                out[key] = float(value)
            elif key == "target":
                out[key] = int(value)
            elif key == "input":
                out[key] = value.strip()
            else:
                raise OptionError(f"unknown expectation key '{key}'; use region, features, min_share, max_share, "
                                  "input, target")
        except ValueError:
            raise OptionError(f"expectation value {key}={value!r} is not valid") from None
    return _checked_expectation(out)


def _checked_expectation(e: dict) -> dict:
    if not isinstance(e, dict):
        raise OptionError(f"an expectation must be an object with region/features and min_share, got {e!r}")
    if ("region" in e) == ("features" in e):
        raise OptionError("an expectation needs exactly one of region=x1,y1,x2,y2 or features=i,j,...")
    if "region" in e and (len(e["region"]) != 4 or e["region"][0] >= e["region"][2] or e["region"][1] >= e["region"][3]):
        raise OptionError(f"region must be x1,y1,x2,y2 with x1 < x2 and y1 < y2, got {e['region']}")
    if "min_share" not in e and "max_share" not in e:
        raise OptionError("an expectation needs min_share (or max_share), e.g. min_share=0.5")
    for k in ("min_share", "max_share"):
        if k in e and not 0 <= e[k] <= 1:
            raise OptionError(f"{k} must be a fraction in [0, 1], got {e[k]}")
    return e


def load_expectations(items) -> list[dict]:
    """--expect values: inline expectations, or paths of JSON files (an object or a list)."""
    out = []
    for item in items:
        p = Path(item)
        if p.suffix.lower() == ".json":
            try:
                data = json.loads(p.read_text())
            except OSError as exc:
                raise InputError(f"cannot read expectations file {p}: {exc.strerror}") from None
            except ValueError as exc:
                raise InputError(f"expectations file {p} is not valid JSON ({exc})") from None
            out += [_checked_expectation(d) for d in (data if isinstance(data, list) else [data])]
        else:
            out.append(parse_expectation(item))
    if not out:
        raise OptionError("give at least one expectation with --expect")
    return out


def check(explainer, x, expectations: list[dict], method: str = "auto", target=None, options=None,
          names=None) -> tuple[list[dict], str, str | None]:
    """Per (sample, expectation) records: the share of |relevance| inside the region."""
    method, note = choose_method(method, (explainer,))
    logits = _logits(explainer, x)
    n = len(logits)
    names = names or [str(i) for i in range(n)]
    predicted = logits.argmax(axis=1)
    records = []
    maps = {}
    for exp in expectations:
        t = exp.get("target", target)
        classes = predicted if t is None else np.broadcast_to(np.asarray(t).reshape(-1), (n,))
        key = tuple(int(c) for c in classes)
        if key not in maps:
            maps[key] = _maps(explainer, x, method, classes, options)
        m = maps[key]
        for i in range(n):
            if "input" in exp and exp["input"] != names[i]:
                continue
            inside = np.zeros(m[i].shape, dtype=bool)
            if "region" in exp:
                if m[i].ndim != 2:
                    raise OptionError("region=x1,y1,x2,y2 applies to images; use features=i,j,... for other inputs")
                x1, y1, x2, y2 = exp["region"]
                inside[max(0, y1):y2, max(0, x1):x2] = True
            else:
                flat = inside.reshape(-1)
                idx = np.asarray(exp["features"])
                if np.any(idx < 0) or np.any(idx >= flat.size):
                    raise OptionError(f"features {exp['features']} out of range: the input has {flat.size}")
                flat[idx] = True
            total = m[i].sum()
            share = float(m[i][inside].sum() / total) if total > 0 else 0.0
            ok = share >= exp.get("min_share", 0.0) and share <= exp.get("max_share", 1.0)
            records.append({"sample": names[i], "target": int(classes[i]), "predicted": int(predicted[i]),
                            "score": float(logits[i, int(classes[i])]),
                            "expectation": {k: v for k, v in exp.items()}, "share": share, "passed": bool(ok)})
    return records, method, note
