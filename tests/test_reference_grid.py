"""The kernels against the step-by-step float64 reference over the contract's grid:
dtype x N x T x with/without initial_state x with/without cu_seqlens x gradients from
y only / final_state only / both, for WKV-7 and WKV-6, through both CPU algorithms (step and
chunked)."""

from __future__ import annotations

import pytest
import torch

from arwkv_ext.testing import rel_error, run_with_grads
from fixtures import DTYPES, HEAD_SIZES, LENGTHS, OP_NAMES, OPS, TOLERANCE, output_names, reference


@pytest.mark.parametrize("grads_from", ["y", "state", "both"])
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("N", HEAD_SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("op", OP_NAMES)
def test_matches_reference(op, dtype, N, T, with_state, packed, grads_from, cpu_algorithm):
    inputs, s0, cu, gy, gs, y_ref, state_ref, g_y, g_s = reference(op, N, T, with_state, packed)
    inputs = [x.to(DTYPES[dtype]) for x in inputs]
    use_y, use_s = grads_from in ("y", "both"), grads_from in ("state", "both")
    y, state, grads = run_with_grads(OPS[op], inputs, s0, cu, gy if use_y else None, gs if use_s else None)
    expected = [
        (a if use_y else 0) + (b if use_s else 0) for a, b in zip(g_y, g_s, strict=True)
    ]
    assert y.dtype == inputs[0].dtype and state.dtype == torch.float32
    tol = TOLERANCE[dtype]
    names = output_names(op, s0 is not None)
    for name, got, want in zip(names, [y, state, *grads], [y_ref, state_ref, *expected], strict=True):
        assert torch.isfinite(got).all(), f"{name} has NaN/Inf"
        if isinstance(want, int):  # no gradient asked for from this loss
            continue
        err = rel_error(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
