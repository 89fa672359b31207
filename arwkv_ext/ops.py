"""Python face of torch.ops.arwkv.wkv7 / wkv6: autograd registration and documented wrappers.

The schemas, the argument checks and the fake (meta) implementations live in C++
(csrc/wkv_ops.cpp, csrc/wkv_checks.cpp), so the ops behave the same whether they are called
through these wrappers or as ``torch.ops.arwkv.*`` from other code.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _setup_context(ctx, inputs, output) -> None:
    # The backward recomputes the state from the inputs (it keeps chunk snapshots of its own), so
    # it needs every input and none of the outputs. An output whose gradient nobody produces
    # (typically the final state) arrives as None rather than as a tensor of zeros, and the
    # kernels treat a missing gradient as zero without reading one.
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


def _asked(ctx, grads) -> tuple:
    """The gradients of the inputs that require one; None for the others (and for cu_seqlens)."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=False))


def _wkv7_backward(ctx, grad_y: Tensor | None, grad_state: Tensor | None):
    r, w, k, v, a, b, initial_state, cu_seqlens = ctx.saved_tensors
    dr, dw, dk, dv, da, db, ds0 = torch.ops.arwkv.wkv7_backward(
        r, w, k, v, a, b, initial_state, cu_seqlens, grad_y, grad_state
    )
    return _asked(ctx, (dr, dw, dk, dv, da, db, ds0 if initial_state is not None else None, None))


def _wkv6_backward(ctx, grad_y: Tensor | None, grad_state: Tensor | None):
    r, w, k, v, u, initial_state, cu_seqlens = ctx.saved_tensors
    dr, dw, dk, dv, du, ds0 = torch.ops.arwkv.wkv6_backward(
        r, w, k, v, u, initial_state, cu_seqlens, grad_y, grad_state
    )
    return _asked(ctx, (dr, dw, dk, dv, du, ds0 if initial_state is not None else None, None))


torch.library.register_autograd("arwkv::wkv7", _wkv7_backward, setup_context=_setup_context)
torch.library.register_autograd("arwkv::wkv6", _wkv6_backward, setup_context=_setup_context)


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
         initial_state: Tensor | None = None,
         cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-7 time mixing (the generalised delta rule), step by step per batch and head::

        sa  = S a_t
        S   = S diag(exp(w_t)) + sa b_t^T + v_t k_t^T
        y_t = S r_t

    Args:
        r, w, k, v, a, b: [B, T, H, N], one dtype: float32, bfloat16, float16 (float64 on
            CPU). N in ``arwkv_ext.HEAD_SIZES``; any B, H >= 1 and T >= 0. ``w`` is the natural log of
            the decay (w <= 0). Non-contiguous and expanded inputs are fine.
        initial_state: [B, H, N, N] float32 (float64 for float64 inputs), ``S[b, h, i, j]`` with
            i = value index, j = key index. None means zeros. With ``cu_seqlens``: [S, H, N, N].
        cu_seqlens: int32/int64 [S + 1] with 0 = c_0 < c_1 < ... < c_S = T. Packs S sequences
            along T (requires B = 1); the state restarts from ``initial_state[s]`` at each start.

    Returns:
        y: [B, T, H, N] in the inputs' dtype (state and accumulation are float32, or float64).
        final_state: [B, H, N, N] (or [S, H, N, N]), the state after the last step.

    Differentiable in every tensor input, from y and from final_state.
    """
    return torch.ops.arwkv.wkv7(r, w, k, v, a, b, initial_state, cu_seqlens)


def wkv6(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
         initial_state: Tensor | None = None,
         cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-6 ("Finch") time mixing, step by step per batch and head::

        y_t[i] = sum_j r_t[j] (S[i, j] + u[j] k_t[j] v_t[i])
        S      = S diag(exp(w_t)) + v_t k_t^T

    Args:
        r, w, k, v: [B, T, H, N], one dtype as for :func:`wkv7`; ``w`` is the log decay.
        u: [H, N], the bonus of the current token, same dtype.
        initial_state, cu_seqlens: as for :func:`wkv7`.

    Returns:
        y [B, T, H, N] in the inputs' dtype and final_state [B or S, H, N, N].
    """
    return torch.ops.arwkv.wkv6(r, w, k, v, u, initial_state, cu_seqlens)
