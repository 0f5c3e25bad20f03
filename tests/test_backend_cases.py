"""Every operator test case shipped with onnx, as a corpus for the gradient rules.

For each operator with a case that has a float input its schema calls differentiable, every
such case either passes a central finite-difference check of its compiled gradient (float64
where onnxruntime runs the case so) or is refused with a typed onnxplain error; none may
end with a wrong gradient, a NaN, a zero gradient where the difference is not zero, or an
untyped exception. See tests/backend_corpus.py for how a case is checked.
"""

from __future__ import annotations

import functools

import pytest

import backend_corpus as bc

# Cases known to fail, with the reason; not this corpus's to fix, listed so that the
# failure stays visible (xfail) and a fix shows up (XPASS).
KNOWN_FAILURES = {
    # Not a wrong gradient: the case's input repeats one plane along depth, so each window holds
    # its maximum twice; the rule's gradient (first maximum, as torch and onnxruntime's Indices)
    # is the gradient on that side of the tie (tests/test_rules_pool.py), but the corpus only
    # recognises a kink where the total's one-sided derivatives bracket it, which seeds of
    # both signs over independent ties break.
    "test_maxpool_3d_dilations": "exact ties in the case's input; the corpus's kink test does not bracket them",
    "test_maxpool_3d_dilations_use_ref_impl": "exact ties in the case's input; the corpus's kink test does not bracket them",
    # Likewise: every tap samples at a whole position (bilinear kinks, offsets -0.1/0/0.5 on a
    # 3x3 map with pads 1); off the kinks and from above at them the gradient is checked in
    # tests/test_rules_roi.py.
    "test_basic_deform_conv_with_padding": "samples on bilinear kinks; the corpus's kink test does not bracket them",
    "test_rnn_seq_length": "float32 rounding of 1 - y^2 in a saturated tanh (0.17 of a 1e-6 gradient; the rule is "
                           "3.8e-8 off a float64 reference in tests/test_rules_recurrent.py)",
}

# The rules this corpus was written with: each must pass at least one of its cases.
NEW_RULES = [
    "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Mish", "Swish", "Shrink",
    "Mod", "LpNormalization", "MeanVarianceNormalization", "GroupNormalization", "RMSNormalization", "LRN",
    "Det", "ScatterElements", "Scatter", "ScatterND", "TopK", "MaxUnpool", "Compress", "CenterCropPad",
    "ReduceProd", "CumSum", "CumProd", "Einsum", "NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss",
    "GridSample", "AffineGrid", "Col2Im", "DFT", "STFT", "Resize", "Upsample",
]


@functools.lru_cache(maxsize=1)
def _corpus():
    cases = bc.load_cases()
    ops, single = bc.operators_of(cases)
    return cases, ops, single


def _has_float_input(case) -> bool:
    return any(i.type.tensor_type.elem_type in bc._FLOATS for i in case.model.graph.input)


def _operators() -> list[str]:
    cases, ops, _ = _corpus()
    return sorted({ops[c.name] for c in cases if _has_float_input(c)})


@functools.lru_cache(maxsize=None)
def _results(op: str):
    cases, ops, single = _corpus()
    out = []
    for c in cases:
        if ops[c.name] == op:
            out.append(bc.check_case(c, op, single.get(c.name) or single.get(bc._stem(c.name))))
    return out


@pytest.mark.parametrize("op", _operators())
def test_backend_cases_pass_finite_differences_or_are_refused_with_a_typed_error(op, request):
    results = _results(op)
    bad = [r for r in results if r.status == "failed" and r.name not in KNOWN_FAILURES]
    assert not bad, "\n".join(f"{r.name} ({r.dtype}): {r.detail}" for r in bad)
    known = [r for r in results if r.status == "failed" and r.name in KNOWN_FAILURES]
    if known:
        request.applymarker(pytest.mark.xfail(reason="; ".join(KNOWN_FAILURES[r.name] for r in known)))
        raise AssertionError("\n".join(f"{r.name}: {r.detail}" for r in known))
    for r in results:
        assert r.status in ("passed", "refused", "n/a"), r


@pytest.mark.parametrize("op", NEW_RULES)
def test_rule_passes_its_backend_cases(op):
    # The operator's own node; an expanded (function-inlined) case tests other operators' rules.
    results = [r for r in _results(op) if r.status != "n/a" and "_expanded" not in r.name]
    passed = [r for r in results if r.status == "passed"]
    assert passed, f"no {op} case passed: {[(r.name, r.status, r.detail) for r in results]}"
    refused = [r for r in results if r.status == "refused"]
    # Only antialiased resizing is refused (it is documented as not supported).
    assert all("antialias" in r.detail for r in refused), [(r.name, r.detail) for r in refused]
