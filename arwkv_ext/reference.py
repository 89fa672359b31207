"""Plain-PyTorch step-by-step recurrences of WKV-7 and WKV-6.

These are the single source of truth for what the kernels compute: the tests and
``benchmarks/bench_wkv.py`` compare the kernels against them. They are slow (one
Python-level step per token), differentiable, and work for any floating dtype and
device. Conventions are the ones of :func:`arwkv_ext.wkv7` / :func:`arwkv_ext.wkv6`:

- inputs ``[B, T, H, N]``; ``w`` is the natural log of the decay (decay = exp(w));
- state ``[B, H, N, N]`` with ``S[b, h, i, j]``: i = value index, j = key index;
- the state and all arithmetic are float32 (float64 for float64 inputs); ``y`` is
  returned in the inputs' dtype;
- ``cu_seqlens`` ``[S+1]`` packs S sequences along T (requires B = 1); the state
  restarts from ``initial_state[s]`` at each start and ``final_state`` is ``[S, H, N, N]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _wkv7_steps(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                state: Tensor) -> tuple[Tensor, Tensor]:
    """One sequence batch: inputs [B, T, H, N] (accumulation dtype), state [B, H, N, N]."""
    ys = []
    for t in range(r.shape[1]):
        sa = torch.einsum("bhij,bhj->bhi", state, a[:, t])
        state = (state * torch.exp(w[:, t]).unsqueeze(-2)
                 + sa.unsqueeze(-1) * b[:, t].unsqueeze(-2)
                 + v[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2))
        ys.append(torch.einsum("bhij,bhj->bhi", state, r[:, t]))
    return _stack_time(ys, r), state


def _wkv6_steps(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
                state: Tensor) -> tuple[Tensor, Tensor]:
    """One sequence batch: inputs [B, T, H, N], u [H, N], state [B, H, N, N]."""
    ys = []
    for t in range(r.shape[1]):
        bonus = (r[:, t] * u * k[:, t]).sum(-1, keepdim=True) * v[:, t]
        ys.append(torch.einsum("bhij,bhj->bhi", state, r[:, t]) + bonus)
        state = (state * torch.exp(w[:, t]).unsqueeze(-2)
                 + v[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2))
    return _stack_time(ys, r), state


def _stack_time(ys: list[Tensor], like: Tensor) -> Tensor:
    if ys:
        return torch.stack(ys, dim=1)
    return like.clone()  # T = 0: empty, but still part of the autograd graph


def _run_packed(steps: Callable[..., tuple[Tensor, Tensor]], seq_inputs: list[Tensor],
                extra: list[Tensor], initial_state: Tensor | None,
                cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """Runs ``steps`` over the batch, or over each packed sequence when cu_seqlens is given."""
    r = seq_inputs[0]
    B, T, H, N = r.shape
    acc = _accumulation_dtype(r.dtype)
    seq_inputs = [x.to(acc) for x in seq_inputs]
    extra = [x.to(acc) for x in extra]
    if cu_seqlens is None:
        bounds = None
        n_states = B
    else:
        bounds = [int(c) for c in cu_seqlens.tolist()]
        n_states = len(bounds) - 1
    if initial_state is None:
        initial_state = torch.zeros(n_states, H, N, N, dtype=acc, device=r.device)
    initial_state = initial_state.to(acc)
    if bounds is None:
        y, final = steps(*seq_inputs, *extra, initial_state)
        return y.to(r.dtype), final
    ys, finals = [], []
    for s in range(n_states):
        lo, hi = bounds[s], bounds[s + 1]
        y_s, final_s = steps(*[x[:, lo:hi] for x in seq_inputs], *extra, initial_state[s:s + 1])
        ys.append(y_s)
        finals.append(final_s)
    return torch.cat(ys, dim=1).to(r.dtype), torch.cat(finals, dim=0)


def wkv7_reference(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                   initial_state: Tensor | None = None,
                   cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Step-by-step WKV-7: ``sa = S a_t; S = S diag(exp(w_t)) + sa b_t^T + v_t k_t^T; y_t = S r_t``.

    Args:
        r, w, k, v, a, b: [B, T, H, N].
        initial_state: [B, H, N, N] (or [S, H, N, N] with cu_seqlens); None means zeros.
        cu_seqlens: [S+1] integer offsets of packed sequences (B must be 1).

    Returns:
        y [B, T, H, N] in the inputs' dtype, final_state [B or S, H, N, N] in float32
        (float64 for float64 inputs).
    """
    return _run_packed(_wkv7_steps, [r, w, k, v, a, b], [], initial_state, cu_seqlens)


def wkv6_reference(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
                   initial_state: Tensor | None = None,
                   cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Step-by-step WKV-6: ``y_t[i] = sum_j r_t[j] (S[i,j] + u[j] k_t[j] v_t[i]);
    S = S diag(exp(w_t)) + v_t k_t^T``.

    Args:
        r, w, k, v: [B, T, H, N]; u: [H, N] (the per-head "bonus" of the current token).
        initial_state: [B, H, N, N] (or [S, H, N, N] with cu_seqlens); None means zeros.
        cu_seqlens: [S+1] integer offsets of packed sequences (B must be 1).

    Returns:
        y [B, T, H, N] in the inputs' dtype, final_state [B or S, H, N, N] in float32
        (float64 for float64 inputs).
    """
    return _run_packed(_wkv6_steps, [r, w, k, v], [u], initial_state, cu_seqlens)
