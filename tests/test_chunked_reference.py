"""The chunked (matrix-form) float64 reference against the step-by-step one, over the grid:
every head size, awkward lengths, packed sequences, initial state and its gradient, and log
decays down to -20, with chunk lengths that do and do not divide T. (By default the grid's
references the default tier computes; `make test-full` all of them.)"""

from __future__ import annotations

import pytest
import torch

from arwkv_ext.chunked_reference import (
    wkv6_chunked,
    wkv6_chunked_backward,
    wkv7_chunked,
    wkv7_chunked_backward,
)
from arwkv_ext.testing import make_inputs, rel_error, run_with_grads
from fixtures import OP_NAMES, REFERENCES, output_names, packing, reference, reference_params

CHUNKED = {"wkv7": (wkv7_chunked, wkv7_chunked_backward), "wkv6": (wkv6_chunked, wkv6_chunked_backward)}
EXACT = 1e-10  # float64: both forms are exact algebra, so only rounding separates them


def check(op, inputs, s0, cu, gy, gs, want, chunk):
    forward, backward = CHUNKED[op]
    y, state = forward(*inputs, s0, cu, chunk=chunk)
    grads = backward(*inputs, s0, cu, gy, gs, chunk=chunk)
    if s0 is None:
        grads = grads[:-1]  # d initial_state is returned anyway (zeros stood for it)
    got = [y, state, *grads]
    names = output_names(op, s0 is not None)
    # dw is a sum of products (gradient * operand) that may cancel to ~0 (a zero state and T = 1:
    # dw is exactly 0): measure it against the size of the terms it sums, not against itself.
    want_by_name = dict(zip(names, want, strict=True))
    terms = max((want_by_name["r"] * inputs[0]).norm().item(), (want_by_name["k"] * inputs[2]).norm().item())
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype, f"{name}: {g.dtype} != {w.dtype}"
        err = rel_error(g, w, floor=terms if name == "w" else 1e-30)
        assert err <= EXACT, f"{name}: relative error {err:.2e} > {EXACT:.0e} (chunk {chunk})"


# Every reference of the grid; by default those the default tier of test_reference_grid.py
# computes (the rest, long and costly, are marked slow).
@pytest.mark.parametrize(("op", "N", "T", "with_state", "packed"), reference_params())
def test_grid_matches_step_reference(op, N, T, with_state, packed):
    inputs, s0, cu, gy, gs, y_ref, state_ref, g_y, g_s = reference(op, N, T, with_state, packed)
    inputs = [x.double() for x in inputs]
    s0 = None if s0 is None else s0.double()
    want = [y_ref, state_ref] + [a + b for a, b in zip(g_y, g_s, strict=True)]
    check(op, inputs, s0, cu, gy, gs, want, chunk=16)


@pytest.mark.parametrize("grads_from", ["y", "state"])
@pytest.mark.parametrize("chunk", [16, 7, 1])
@pytest.mark.parametrize("op", OP_NAMES)
def test_wide_decays_any_chunk(op, chunk, grads_from):
    """Log decays down to -20 (a decay of 2e-9 per step; cumulative decays underflow inside a
    chunk) and chunk lengths that do not divide the sequences; gradients from y or the state."""
    T, H, N = 45, 2, 16
    inputs = make_inputs(op, 1, T, H, N, dtype=torch.float64, decay="wide", min_log_decay=-20.0, seed=7)
    cu = torch.tensor(packing(T))
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn(len(cu) - 1, H, N, N, generator=g, dtype=torch.float64)
    gy = torch.randn(1, T, H, N, generator=g, dtype=torch.float64) if grads_from == "y" else None
    gs = (torch.randn(len(cu) - 1, H, N, N, generator=g, dtype=torch.float64)
          if grads_from == "state" else None)
    y, state, grads = run_with_grads(REFERENCES[op], inputs, s0, cu, gy, gs)
    check(op, inputs, s0, cu, gy, gs, [y, state, *grads], chunk)


@pytest.mark.parametrize("op", OP_NAMES)
def test_float32_chunked_within_contract(op):
    """In float32 (the kernels' arithmetic) the chunked form keeps the ops' contract, 1e-4 of
    float64, at the contract's decays down to -20."""
    T, H, N = 300, 2, 32
    inputs = make_inputs(op, 2, T, H, N, dtype=torch.float64, decay="wide", min_log_decay=-20.0, seed=3)
    forward, backward = CHUNKED[op]
    y64, s64 = forward(*inputs)
    gy = torch.randn_like(y64)
    g64 = backward(*inputs, None, None, gy, None)
    f32 = [x.float() for x in inputs]
    y32, s32 = forward(*f32)
    g32 = backward(*f32, None, None, gy.float(), None)
    for name, got, want in zip(output_names(op, True), [y32, s32, *g32], [y64, s64, *g64], strict=True):
        assert got.dtype == torch.float32
        assert torch.isfinite(got).all(), f"{name} has NaN/Inf"
        assert rel_error(got, want) <= 1e-4, f"{name}: {rel_error(got, want):.2e}"
