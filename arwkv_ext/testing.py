"""Inputs for tests and benchmarks that look like a real model's (one place, shared by both).

Unstructured random a, b make the WKV-7 state explode at long T, so, as in trained RWKV-7
layers, ``a = -normalize(k')`` and ``b = normalize(k') * sigmoid(.)``. The log decay is drawn
either like the models' (``decay="model"``: exp(w) in [0.545, 1), RWKV-7's clamp) or over a
wide range (``decay="wide"``: log decays down to ``min_log_decay``, default -20).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
RWKV7_MIN_LOG_DECAY = -0.6065306597126334  # -exp(-0.5): decay >= 0.545


def make_inputs(op: str, B: int, T: int, H: int, N: int, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0, decay: str = "model",
                min_log_decay: float = -20.0) -> list[Tensor]:
    """Returns [r, w, k, v, a, b] for ``op="wkv7"`` or [r, w, k, v, u] for ``op="wkv6"``.

    Every sequence tensor is [B, T, H, N]; u is [H, N]. Values are drawn in float64 on the CPU
    from ``seed`` and then cast, so every dtype and device sees the same numbers.
    """
    if op not in ("wkv7", "wkv6"):
        raise ValueError(f"op must be 'wkv7' or 'wkv6', got {op!r}")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shape = (B, T, H, N)
    r, k, v = randn(*shape), randn(*shape) / N**0.5, randn(*shape)
    if decay == "model":
        w = RWKV7_MIN_LOG_DECAY * torch.sigmoid(randn(*shape))
    elif decay == "wide":
        w = min_log_decay * torch.rand(*shape, generator=g, dtype=torch.float64)
    else:
        raise ValueError(f"decay must be 'model' or 'wide', got {decay!r}")
    if op == "wkv7":
        kk = torch.nn.functional.normalize(randn(*shape), dim=-1)
        tensors = [r, w, k, v, -kk, kk * torch.sigmoid(randn(*shape))]
    else:
        tensors = [r, w, k, v, randn(H, N) / N**0.5]
    return [t.to(device=device, dtype=dtype) for t in tensors]


def rel_error(x: Tensor, ref: Tensor, floor: float = 1e-30) -> float:
    """Relative Frobenius error ||x - ref|| / max(||ref||, floor), computed in float64.

    The floor only matters for references far below float32's range (it ends near 1e-38),
    such as the gradient of an initial state after a thousand decaying steps, where a
    relative error means nothing.
    """
    x64, ref64 = x.detach().double().cpu(), ref.detach().double().cpu()
    return (x64 - ref64).norm().item() / max(ref64.norm().item(), floor)


def run_with_grads(fn, inputs: list[Tensor], initial_state: Tensor | None, cu_seqlens: Tensor | None,
                   grad_y: Tensor | None, grad_state: Tensor | None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Runs ``fn(*inputs, initial_state, cu_seqlens)`` (an op or a reference) and differentiates
    loss = <y, grad_y> + <final_state, grad_state> (a None term is left out).

    Returns y, final_state and the gradients of every input (then of initial_state, if given);
    an input the loss does not depend on gets zeros.
    """
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
