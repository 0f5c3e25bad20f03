"""Gradients of TensorScatter and RoiAlign equal finite differences (float64 where
onnxruntime has the kernel), for write positions and boxes only known at run time."""

import numpy as np
import pytest

import backend_corpus as bc


def _passes(result):
    assert result.status == "passed", (result.status, result.detail)


# --- TensorScatter (opset 24) ------------------------------------------------------------------
@pytest.mark.parametrize("mode,indices", [("linear", [0, 2]), ("circular", [3, 4]), ("linear", None)],
                         ids=["linear", "circular_wraps", "no_write_indices"])
@pytest.mark.parametrize("axis", [-2, 1])
def test_tensor_scatter_gradient_reaches_the_kept_cache_and_the_written_update(mode, indices, axis):
    rng = np.random.default_rng(0)
    # (batch 2, max length 5, 3) with a 2-long update along axis 1 (= -2).
    past, update = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 2, 3))
    consts = {} if indices is None else {"w": np.array(indices, np.int64)}
    order = ["past", "update"] + ([] if indices is None else ["w"])
    _passes(bc.check_node("TensorScatter", {"past": past, "update": update}, {"mode": mode, "axis": axis,
                                                                            "_order": order},
                          consts=consts, opset=24))


def test_tensor_scatter_4d_cache_on_the_sequence_axis():
    rng = np.random.default_rng(1)
    past, update = rng.normal(size=(2, 3, 6, 4)), rng.normal(size=(2, 3, 1, 4))
    _passes(bc.check_node("TensorScatter", {"past": past, "update": update}, {"mode": "circular"},
                          consts={"w": np.array([5, 2], np.int64)}, opset=24))
