"""Shared by the tests: run an op or the reference with gradients from y and/or final_state."""

from __future__ import annotations

import torch

import arwkv_ext
from arwkv_ext.reference import wkv6_reference, wkv7_reference

OPS = {"wkv7": arwkv_ext.wkv7, "wkv6": arwkv_ext.wkv6}
REFERENCES = {"wkv7": wkv7_reference, "wkv6": wkv6_reference}


def run_with_grads(fn, inputs: list[torch.Tensor], initial_state: torch.Tensor | None,
                   cu_seqlens: torch.Tensor | None, grad_y: torch.Tensor | None,
                   grad_state: torch.Tensor | None):
    """Returns (y, final_state, grads of inputs (+ initial_state)) for loss = <y, gy> + <S, gs>."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    s0 = None if initial_state is None else initial_state.detach().clone().requires_grad_()
    y, state = fn(*leaves, s0, cu_seqlens)
    loss = y.new_zeros((), dtype=torch.float64)
    if grad_y is not None:
        loss = loss + (y.double() * grad_y.double()).sum()
    if grad_state is not None:
        loss = loss + (state.double() * grad_state.double()).sum()
    wrt = leaves + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt, strict=True)]
    return y.detach(), state.detach(), grads
