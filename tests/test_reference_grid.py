"""The kernels against the step-by-step float64 reference over the contract's grid:
dtype x N x T x with/without initial_state x with/without cu_seqlens x gradients from
y only / final_state only / both, for WKV-7 and WKV-6."""

from __future__ import annotations

import functools

import pytest
import torch

from arwkv_ext.testing import make_inputs, rel_error
from helpers import OPS, REFERENCES, run_with_grads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative Frobenius error against float64. 16-bit inputs return y and gradients rounded to
# 16 bits, so their bound reflects that rounding, not the float32 arithmetic inside.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
HEAD_SIZES = [16, 32, 64, 128]
LENGTHS = [1, 2, 15, 16, 17, 100, 1000]
H = 2


def packing(T: int) -> list[int]:
    """Up to three packed sequences of uneven lengths covering [0, T)."""
    cuts = sorted({0, T // 3, (2 * T) // 3 + 1, T} - {T + 1})
    return [c for c in cuts if c <= T]


@functools.cache
def reference(op: str, N: int, T: int, with_state: bool, packed: bool):
    """float64 reference with gradients from y and from the state, shared by every dtype.

    The inputs are rounded to bfloat16 once, so float32, bfloat16 and float16 copies of them
    hold the same numbers and one float64 reference serves all three.
    """
    B = 1 if packed else 2
    inputs = [x.to(torch.bfloat16).float() for x in make_inputs(op, B, T, H, N, seed=N * 1000 + T)]
    cu = torch.tensor(packing(T), dtype=torch.int32) if packed else None
    S = len(packing(T)) - 1 if packed else B
    g = torch.Generator().manual_seed(T)
    s0 = torch.randn(S, H, N, N, generator=g) * 0.3 if with_state else None  # non-symmetric
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    gs = torch.randn(S, H, N, N, generator=g, dtype=torch.float64)
    leaves = [x.double().requires_grad_() for x in inputs]
    if s0 is not None:
        leaves.append(s0.double().requires_grad_())
    y, state = REFERENCES[op](*leaves[: len(inputs)], leaves[-1] if s0 is not None else None, cu)
    g_y = torch.autograd.grad((y * gy).sum(), leaves, retain_graph=True, allow_unused=True)
    g_s = torch.autograd.grad((state * gs).sum(), leaves, allow_unused=True)
    zero = [torch.zeros_like(x) for x in leaves]
    g_y = [z if g is None else g for g, z in zip(g_y, zero, strict=True)]
    g_s = [z if g is None else g for g, z in zip(g_s, zero, strict=True)]
    return inputs, s0, cu, gy, gs, y.detach(), state.detach(), g_y, g_s


@pytest.mark.parametrize("grads_from", ["y", "state", "both"])
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("N", HEAD_SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_matches_reference(op, dtype, N, T, with_state, packed, grads_from):
    inputs, s0, cu, gy, gs, y_ref, state_ref, g_y, g_s = reference(op, N, T, with_state, packed)
    inputs = [x.to(DTYPES[dtype]) for x in inputs]
    use_y, use_s = grads_from in ("y", "both"), grads_from in ("state", "both")
    y, state, grads = run_with_grads(OPS[op], inputs, s0, cu, gy if use_y else None, gs if use_s else None)
    expected = [
        (a if use_y else 0) + (b if use_s else 0) for a, b in zip(g_y, g_s, strict=True)
    ]
    assert y.dtype == inputs[0].dtype and state.dtype == torch.float32
    tol = TOLERANCE[dtype]
    names = ["y", "final_state"] + ["r", "w", "k", "v"] + (["a", "b"] if op == "wkv7" else ["u"])
    names += ["initial_state"] if s0 is not None else []
    for name, got, want in zip(names, [y, state, *grads], [y_ref, state_ref, *expected], strict=True):
        assert torch.isfinite(got).all(), f"{name} has NaN/Inf"
        if isinstance(want, int):  # no gradient asked for from this loss
            continue
        err = rel_error(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
