"""The ops' autograd registration: gradients only for the inputs that ask for one, and an unused
output (the final state, or y) costs no materialised zero gradient and changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from arwkv_ext.testing import make_inputs, rel_error
from fixtures import OP_NAMES, OPS


@pytest.mark.parametrize("op", OP_NAMES)
def test_gradient_only_for_inputs_that_ask(op):
    inputs = make_inputs(op, 2, 13, 3, 16, seed=3)
    inputs[0].requires_grad_()  # r only
    y, _ = OPS[op](*inputs)
    y.sum().backward()
    assert inputs[0].grad is not None and torch.isfinite(inputs[0].grad).all()
    assert all(x.grad is None for x in inputs[1:])


class RecordBackwardCalls(TorchDispatchMode):
    """Records the arguments of every call to a WKV backward op."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("arwkv::wkv") and "backward" in func.name():
            self.calls.append(args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", OP_NAMES)
def test_unused_final_state_is_not_materialised(op):
    """Only y is used: the backward op gets grad_state=None, not a tensor of zeros."""
    inputs = [x.requires_grad_() for x in make_inputs(op, 1, 9, 2, 16, seed=1)]
    y, _ = OPS[op](*inputs)
    with RecordBackwardCalls() as record:
        y.sum().backward()
    (args,) = record.calls
    grad_y, grad_state = args[-2:]
    assert grad_y is not None and grad_state is None


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("used", ["y", "state"])
def test_unused_output_is_a_zero_gradient(op, used):
    """Differentiating through one output only gives the same gradients as passing an explicit
    zero gradient for the other."""
    inputs = make_inputs(op, 1, 29, 2, 32, seed=5)
    s0 = torch.randn(1, 2, 32, 32)
    leaves = [x.clone().requires_grad_() for x in [*inputs, s0]]
    y, state = OPS[op](*leaves)
    gy, gs = torch.randn_like(y), torch.randn_like(state)
    loss = (y * gy).sum() if used == "y" else (state * gs).sum()
    got = torch.autograd.grad(loss, leaves)
    y2, state2 = OPS[op](*leaves)
    want = torch.autograd.grad(
        (y2, state2),
        leaves,
        grad_outputs=(gy if used == "y" else torch.zeros_like(y2),
                      gs if used == "state" else torch.zeros_like(state2)),
    )
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) == 0.0
