"""Random valid configurations — shapes, dtypes, memory layouts, packed sequences and
requires_grad patterns — compared with the float64 step-by-step reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arwkv_ext.testing import make_inputs, rel_error
from fixtures import HEAD_SIZES, OP_NAMES, OPS, REFERENCES

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}


@st.composite
def configs(draw):
    op = draw(st.sampled_from(OP_NAMES))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    N = draw(st.sampled_from(HEAD_SIZES))
    H = draw(st.integers(1, 3))
    T = draw(st.integers(0, 40))
    packed = T > 0 and draw(st.booleans())
    if packed:
        B = 1
        inner = draw(st.lists(st.integers(1, T - 1), unique=True, max_size=4)) if T > 1 else []
        cu = [0, *sorted(inner), T]
    else:
        B, cu = draw(st.integers(1, 3)), None
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    n_inputs = 6 if op == "wkv7" else 5
    grad_mask = draw(st.lists(st.booleans(), min_size=n_inputs + 1, max_size=n_inputs + 1))
    with_state = draw(st.booleans())
    cu_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    seed = draw(st.integers(0, 2**16))
    return op, dtype, B, T, H, N, cu, cu_dtype, layout, grad_mask, with_state, seed


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, other strides."""
    if x.dim() != 4 or layout == "contiguous":
        return x
    if layout == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        return torch.cat([x, x], dim=-1)[..., ::2] if x.shape[-1] else x
    return x[:1].expand(*x.shape) if x.shape[0] else x  # stride 0 along B


@given(configs())
def test_random_configurations_match_reference(cfg):
    check_configuration(cfg)


# Ten times the examples (other ones: derandomize seeds each test by its name), in make test-full.
@pytest.mark.slow
@settings(max_examples=400)
@given(configs())
def test_more_random_configurations_match_reference(cfg):
    check_configuration(cfg)


def check_configuration(cfg):
    op, dtype, B, T, H, N, cu, cu_dtype, layout, grad_mask, with_state, seed = cfg
    inputs = [relayout(x, layout) for x in make_inputs(op, B, T, H, N, dtype=dtype, seed=seed)]
    S = len(cu) - 1 if cu is not None else B
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(S, H, N, N, dtype=state_dtype, generator=torch.Generator().manual_seed(seed)) * 0.3
    cu_t = None if cu is None else torch.tensor(cu, dtype=cu_dtype)

    def run(fn, xs, state):
        leaves = [x.detach().clone().requires_grad_(m) for x, m in zip(xs, grad_mask, strict=False)]
        s = state.detach().clone().requires_grad_(grad_mask[-1]) if with_state else None
        y, final = fn(*leaves, s, cu_t)
        wrt = [x for x in [*leaves, s] if x is not None and x.requires_grad]
        if not wrt:
            return [y, final]
        loss = (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)).sum()
        loss = loss + final.double().sum()
        if not loss.requires_grad:  # e.g. T = 0 and only b requires grad: nothing depends on it
            return [y, final, *[torch.zeros_like(x) for x in wrt]]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        return [y, final, *[torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt, strict=True)]]

    got = run(OPS[op], inputs, s0)
    want = run(REFERENCES[op], [x.double() for x in inputs], s0.double())
    assert got[0].dtype == dtype and got[0].shape == (B, T, H, N)
    assert got[1].dtype == state_dtype and got[1].shape == (S, H, N, N)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        assert rel_error(a, b) <= TOLERANCE[dtype], rel_error(a, b)
