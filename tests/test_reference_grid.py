"""The kernels against the step-by-step float64 reference over the contract's grid:
dtype x N x T x with/without initial_state x with/without cu_seqlens x gradients from
y only / final_state only / both, for WKV-7 and WKV-6, through both CPU algorithms (step and
chunked).

By default (`make test`, `pytest -m "not slow"`) a fixed part of the grid runs: every pair of
values of any two axes, plus a fixed seeded sample of the rest (fixtures.grid_tiers); the other
cases are marked slow, and `make test-full` (or this file on its own) runs all of them."""

from __future__ import annotations

import itertools

import pytest
import torch

from arwkv_ext.testing import rel_error, run_with_grads
from fixtures import (
    DTYPES,
    GRID_AXES,
    OPS,
    TOLERANCE,
    grid_params,
    grid_tiers,
    output_names,
    reference,
)


@pytest.mark.parametrize(("op", "dtype", "N", "T", "with_state", "packed", "grads_from", "cpu_algorithm"),
                         grid_params(), indirect=["cpu_algorithm"])
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


def test_default_tier_covers_every_pair():
    """The default tier holds every pair of values of any two axes of the grid (so every value
    of every axis), and is the same set on every call."""
    cases, cover, sample = grid_tiers()
    assert len(cases) == len(list(itertools.product(*GRID_AXES.values())))
    default = [cases[i] for i in cover | sample]
    axes = list(GRID_AXES.items())
    for i, j in itertools.combinations(range(len(axes)), 2):
        missing = set(itertools.product(axes[i][1], axes[j][1])) - {(c[i], c[j]) for c in default}
        assert not missing, f"{axes[i][0]} x {axes[j][0]}: {sorted(missing)} not in the default tier"
    grid_tiers.cache_clear()
    assert grid_tiers() == (cases, cover, sample)
