"""The chunked (matrix) form of WKV-7 and WKV-6, forward and backward, in plain PyTorch.

This is the algorithm of the chunked kernels, written to be read: the kernels in csrc/ follow
it step for step, and the tests check it against the step recurrences of
:mod:`arwkv_ext.reference` (to 1e-10 in float64). Arithmetic is float64 for float64 inputs and
float32 otherwise, as in the step reference; conventions (shapes, ``w`` = log decay, state
``S[i, j]`` with i = value row and j = key) are those of :func:`arwkv_ext.wkv7`.

One chunk of L steps t = 0 .. L-1 enters with the state S. Write d_t = exp(w_t) and, per key
channel j, the decay between two steps as a running product

    E[t, s] = d_{s+1} * ... * d_t   (s <= t; E[t, t] = 1),

so that S_t = S_{-1} E[t, -1] + sum_{s <= t} (sa_s b_s^T + v_s k_s^T) diag(E[t, s]). Every decay
factor used below is such a product over a sub-interval of the chunk: it is <= 1, and it is
never formed by dividing one cumulative decay by another (which underflows to 0 / 0 at log
decays like -20). WKV-7, with sa_t = S_{t-1} a_t:

    decayed operands   a~_t = a_t E[t-1, -1],  r~_t = r_t E[t, -1]      (carry the decay from
                       b^_s = b_s E[L-1, s],   k^_s = k_s E[L-1, s]      the chunk start / to
                       Gamma = E[L-1, -1]                                 the chunk end)
    L x L matrices     A_ab[t, s] = sum_j a_t b_s E[t-1, s]  (s < t),  A_ak: same with k_s
                       A_rb[t, s] = sum_j r_t b_s E[t, s]    (s <= t), A_rk: same with k_s
    the sa vectors     (I - A_ab) SA = a~ S^T + A_ak V         (unit lower-triangular solve)
    outputs            Y = r~ S^T + A_rb SA + A_rk V
    next state         S' = S diag(Gamma) + SA^T b^ + V^T k^

(SA, V, Y, a~, ... are [L, N] with one row per step.) WKV-6 is the case without a, b: its output
reads the state before the update, so its matrix A[t, s] = sum_j r_t k_s E[t-1, s] (s < t) has
the bonus r_t . (u * k_t) on its diagonal, and r' = r_t E[t-1, -1] replaces r~.

The backward runs the chunks in reverse and recomputes each chunk's matrices from the state at
its start (stored by the forward). The gradient of the log decays needs no division either: a
factor E[t, s] is exp(G_t - G_s) with G the cumulative log decay, so each operand carrying
exp(+G_t) (r~_t; a~_{t+1}) adds (its raw gradient * itself) to dG_t, each carrying exp(-G_s)
(k_s, b_s in every use) subtracts it, and the decay to the chunk end adds its share to dG_{L-1};
then dw_u = sum_{t >= u} dG_t (a reverse cumulative sum inside the chunk).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

CHUNK = 16
"""The chunk length L the kernels use."""


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _decays(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decay products of one chunk, by running products only.

    Args:
        w: [..., L, N] log decays.

    Returns:
        E: [..., L, L, N], E[t, s] = d_{s+1} ... d_t for s <= t, 0 above the diagonal;
        to_t: [..., L, N], E[t, -1] = d_0 ... d_t (from the chunk start through step t);
        before_t: [..., L, N], E[t-1, -1] = d_0 ... d_{t-1} (1 for t = 0);
        to_end: [..., L, N], E[L-1, s] = d_{s+1} ... d_{L-1} (1 for s = L-1).
    """
    d = torch.exp(w)
    L = w.shape[-2]
    t = torch.arange(L, device=w.device)
    after = (t[:, None] > t[None, :]).unsqueeze(-1)  # [t, s, 1]: t > s
    # factor t of the product E[., s]: d_t for t > s, 1 otherwise; cumprod over t gives E.
    factors = torch.where(after, d.unsqueeze(-2), torch.ones_like(d).unsqueeze(-2))
    E = torch.cumprod(factors, dim=-3) * (t[:, None] >= t[None, :]).unsqueeze(-1)
    to_t = torch.cumprod(d, dim=-2)
    before_t = torch.cat([torch.ones_like(d[..., :1, :]), to_t[..., :-1, :]], dim=-2)
    to_end = E[..., L - 1, :, :]
    return E, to_t, before_t, to_end


def _shift_down(E: Tensor) -> Tensor:
    """E[t-1, s] at row t (row 0 zero): the decays that an a- or WKV-6 r-row sees."""
    return torch.cat([torch.zeros_like(E[..., :1, :, :]), E[..., :-1, :, :]], dim=-3)


def _pair(x: Tensor, y: Tensor, E: Tensor) -> Tensor:
    """M[t, s] = sum_j x_t[j] y_s[j] E[t, s, j] for x, y [..., L, N], E [..., L, L, N]."""
    return torch.einsum("...tj,...sj,...tsj->...ts", x, y, E)


def _to_rows(dM: Tensor, y: Tensor, E: Tensor) -> Tensor:
    """The gradient of _pair's x from dM [..., L, L]: sum_s dM[t, s] y_s E[t, s]."""
    return torch.einsum("...ts,...sj,...tsj->...tj", dM, y, E)


def _to_cols(dM: Tensor, x: Tensor, E: Tensor) -> Tensor:
    """The gradient of _pair's y from dM: sum_t dM[t, s] x_t E[t, s]."""
    return torch.einsum("...ts,...tj,...tsj->...sj", dM, x, E)


# ---- WKV-7 -----------------------------------------------------------------------------------

def _wkv7_chunk(S: Tensor, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor):
    """One chunk forward. S [..., N, N]; r, w, k, v, a, b [..., L, N].

    Returns Y [..., L, N], the next state, and what the backward reuses.
    """
    E, to_t, before_t, to_end = _decays(w)
    Eprev = _shift_down(E)
    a_t, r_t = a * before_t, r * to_t
    b_h, k_h = b * to_end, k * to_end
    gamma = to_t[..., -1, :]
    A_ab, A_ak = _pair(a, b, Eprev), _pair(a, k, Eprev)  # zero on the diagonal: Eprev[t, t] = 0
    A_rb, A_rk = _pair(r, b, E), _pair(r, k, E)
    L = w.shape[-2]
    eye = torch.eye(L, dtype=S.dtype, device=S.device)
    Z = a_t @ S.transpose(-1, -2) + A_ak @ v
    SA = torch.linalg.solve_triangular(eye - A_ab, Z, upper=False, unitriangular=True)
    Y = r_t @ S.transpose(-1, -2) + A_rb @ SA + A_rk @ v
    S_next = S * gamma.unsqueeze(-2) + SA.transpose(-1, -2) @ b_h + v.transpose(-1, -2) @ k_h
    saved = (E, Eprev, to_t, before_t, to_end, a_t, r_t, b_h, k_h, gamma, A_ab, A_ak, A_rb, A_rk, SA)
    return Y, S_next, saved


def _wkv7_chunk_backward(S: Tensor, r, w, k, v, a, b, dY: Tensor, dS_next: Tensor):
    """Gradients of one chunk: given dY [..., L, N] and dS_next [..., N, N], returns
    (dS, dr, dw, dk, dv, da, db)."""
    _, _, saved = _wkv7_chunk(S, r, w, k, v, a, b)
    E, Eprev, to_t, before_t, to_end, a_t, r_t, b_h, k_h, gamma, A_ab, A_ak, A_rb, A_rk, SA = saved
    L = w.shape[-2]
    eye = torch.eye(L, dtype=S.dtype, device=S.device)
    # through the outputs and the next state to SA, then through the triangular solve
    dSA = A_rb.transpose(-1, -2) @ dY + b_h @ dS_next.transpose(-1, -2)
    dZ = torch.linalg.solve_triangular((eye - A_ab).transpose(-1, -2), dSA, upper=True, unitriangular=True)
    dv = A_rk.transpose(-1, -2) @ dY + k_h @ dS_next.transpose(-1, -2) + A_ak.transpose(-1, -2) @ dZ
    dS = dS_next * gamma.unsqueeze(-2) + dY.transpose(-1, -2) @ r_t + dZ.transpose(-1, -2) @ a_t
    # the L x L matrices (masks: s <= t for r-rows, s < t for a-rows)
    incl = torch.tril(torch.ones(L, L, dtype=torch.bool, device=S.device))
    excl = torch.tril(incl, diagonal=-1)
    dA_rb = (dY @ SA.transpose(-1, -2)) * incl
    dA_rk = (dY @ v.transpose(-1, -2)) * incl
    dA_ab = (dZ @ SA.transpose(-1, -2)) * excl
    dA_ak = (dZ @ v.transpose(-1, -2)) * excl
    # the decayed operands, each back to its raw input
    dr = (dY @ S) * to_t
    da = (dZ @ S) * before_t
    db_end = (SA @ dS_next) * to_end  # the parts that reach the next state
    dk_end = (v @ dS_next) * to_end
    # the L x L matrices back to their operands: row operands sum over s, column ones over t
    dr = dr + _to_rows(dA_rb, b, E) + _to_rows(dA_rk, k, E)
    da = da + _to_rows(dA_ab, b, Eprev) + _to_rows(dA_ak, k, Eprev)
    db = db_end + _to_cols(dA_rb, r, E) + _to_cols(dA_ab, a, Eprev)
    dk = dk_end + _to_cols(dA_rk, r, E) + _to_cols(dA_ak, a, Eprev)
    # log decays: dG_t collects (raw gradient * operand) with the sign of the exponent it carries
    dgamma = (S * dS_next).sum(-2)
    dG = dr * r - dk * k - db * b
    dG[..., :-1, :] += (da * a)[..., 1:, :]
    dG[..., -1, :] += dgamma * gamma + (dk_end * k + db_end * b).sum(-2)
    dw = torch.flip(torch.cumsum(torch.flip(dG, [-2]), -2), [-2])
    return dS, dr, dw, dk, dv, da, db


# ---- WKV-6 -----------------------------------------------------------------------------------

def _wkv6_chunk(S: Tensor, r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor):
    """One chunk forward. S [..., N, N]; r, w, k, v [..., L, N]; u [..., 1, N]."""
    E, to_t, before_t, to_end = _decays(w)
    Eprev = _shift_down(E)
    r_p, k_h = r * before_t, k * to_end
    gamma = to_t[..., -1, :]
    A = _pair(r, k, Eprev) + torch.diag_embed((r * u * k).sum(-1))
    Y = r_p @ S.transpose(-1, -2) + A @ v
    S_next = S * gamma.unsqueeze(-2) + v.transpose(-1, -2) @ k_h
    return Y, S_next, (Eprev, before_t, to_end, r_p, k_h, gamma, A)


def _wkv6_chunk_backward(S: Tensor, r, w, k, v, u, dY: Tensor, dS_next: Tensor):
    """Gradients of one chunk: returns (dS, dr, dw, dk, dv, du [..., 1, N])."""
    _, _, (Eprev, before_t, to_end, r_p, k_h, gamma, A) = _wkv6_chunk(S, r, w, k, v, u)
    L = w.shape[-2]
    dv = A.transpose(-1, -2) @ dY + k_h @ dS_next.transpose(-1, -2)
    dS = dS_next * gamma.unsqueeze(-2) + dY.transpose(-1, -2) @ r_p
    dA = (dY @ v.transpose(-1, -2)) * torch.tril(torch.ones(L, L, dtype=torch.bool, device=S.device))
    bonus = torch.diagonal(dA, dim1=-2, dim2=-1).unsqueeze(-1)  # dA[t, t]: [..., L, 1]
    dk_end = (v @ dS_next) * to_end
    # the parts that carry decays (the diagonal bonus carries none: kept out of dG)
    dr = (dY @ S) * before_t + _to_rows(dA, k, Eprev)
    dk = dk_end + _to_cols(dA, r, Eprev)
    dgamma = (S * dS_next).sum(-2)
    dG = -dk * k
    dG[..., :-1, :] += (dr * r)[..., 1:, :]
    dG[..., -1, :] += dgamma * gamma + (dk_end * k).sum(-2)
    dw = torch.flip(torch.cumsum(torch.flip(dG, [-2]), -2), [-2])
    du = (bonus * r * k).sum(-2, keepdim=True)
    return dS, dr + bonus * u * k, dw, dk + bonus * u * r, dv, du


# ---- sequences: chunk grid, padding, packing ------------------------------------------------

def _to_chunks(x: Tensor, L: int) -> Tensor:
    """[B, T, H, N] -> [B, H, C, L, N], the last chunk padded with zeros (identity steps:
    w = 0 is a decay of 1, and zero r, k, v, a, b add nothing)."""
    B, T, H, N = x.shape
    C = (T + L - 1) // L
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, C * L - T))
    return x.reshape(B, C, L, H, N).permute(0, 3, 1, 2, 4)


def _from_chunks(x: Tensor, T: int) -> Tensor:
    """[B, H, C, L, N] -> [B, T, H, N]."""
    B, H, C, L, N = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, C * L, H, N)[:, :T]


def _segments(T: int, n_states: int, cu_seqlens: Tensor | None) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    bounds = [int(c) for c in cu_seqlens.tolist()]
    return [(bounds[s], bounds[s + 1]) for s in range(n_states)]


def _forward(chunk_fn, seq: list[Tensor], extra: list[Tensor], initial_state, cu_seqlens, L):
    r = seq[0]
    B, T, H, N = r.shape
    acc = _acc(r.dtype)
    n_states = B if cu_seqlens is None else cu_seqlens.numel() - 1
    S0 = (torch.zeros(n_states, H, N, N, dtype=acc, device=r.device) if initial_state is None
          else initial_state.to(acc))
    ys, finals = [], []
    for s, (lo, hi) in enumerate(_segments(T, n_states, cu_seqlens)):
        xs = [_to_chunks(x[:, lo:hi].to(acc), L) for x in seq]
        ext = [e.to(acc).unsqueeze(-2) for e in extra]  # [H, 1, N]: broadcasts over steps
        S = S0 if cu_seqlens is None else S0[s:s + 1]
        chunk_ys = []
        for c in range(xs[0].shape[2]):
            Y, S, _ = chunk_fn(S, *[x[:, :, c] for x in xs], *ext)
            chunk_ys.append(Y)
        y = torch.stack(chunk_ys, 2) if chunk_ys else xs[0]
        ys.append(_from_chunks(y, hi - lo))
        finals.append(S)
    return torch.cat(ys, 1).to(r.dtype), torch.cat(finals, 0)


def _backward(chunk_fn, chunk_bwd, seq, extra, initial_state, cu_seqlens, grad_y, grad_state, L):
    r = seq[0]
    B, T, H, N = r.shape
    acc = _acc(r.dtype)
    n_states = B if cu_seqlens is None else cu_seqlens.numel() - 1
    zeros_state = torch.zeros(n_states, H, N, N, dtype=acc, device=r.device)
    S0 = zeros_state if initial_state is None else initial_state.to(acc)
    dS_end = zeros_state if grad_state is None else grad_state.to(acc)
    gy = torch.zeros(B, T, H, N, dtype=acc, device=r.device) if grad_y is None else grad_y.to(acc)
    grads = [torch.zeros(B, T, H, N, dtype=acc, device=r.device) for _ in seq]
    d_extra = [torch.zeros(H, N, dtype=acc, device=r.device) for _ in extra]
    d_s0 = torch.empty_like(S0)
    for s, (lo, hi) in enumerate(_segments(T, n_states, cu_seqlens)):
        xs = [_to_chunks(x[:, lo:hi].to(acc), L) for x in seq]
        dys = _to_chunks(gy[:, lo:hi], L)
        ext = [e.to(acc).unsqueeze(-2) for e in extra]  # [H, 1, N]: broadcasts over steps
        rows = slice(None) if cu_seqlens is None else slice(s, s + 1)
        # forward: the state entering every chunk
        starts, S = [], S0[rows]
        for c in range(xs[0].shape[2]):
            starts.append(S)
            _, S, _ = chunk_fn(S, *[x[:, :, c] for x in xs], *ext)
        # backward over the chunks in reverse
        dS = dS_end[rows]
        chunk_grads = [[None] * xs[0].shape[2] for _ in seq]
        for c in reversed(range(xs[0].shape[2])):
            dS, *g = chunk_bwd(starts[c], *[x[:, :, c] for x in xs], *ext, dys[:, :, c], dS)
            for q in range(len(seq)):
                chunk_grads[q][c] = g[q]
            for q in range(len(extra)):
                d_extra[q] += g[len(seq) + q].sum(0).squeeze(-2)
        for q in range(len(seq)):
            if chunk_grads[q]:
                grads[q][:, lo:hi] = _from_chunks(torch.stack(chunk_grads[q], 2), hi - lo)
        d_s0[rows] = dS
    out = [g.to(r.dtype) for g in grads] + [d.to(r.dtype) for d in d_extra]
    return (*out, d_s0)


def wkv7_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                 initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                 chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """WKV-7 by chunks of ``chunk`` steps; same arguments and results as
    :func:`arwkv_ext.reference.wkv7_reference` (inputs [B, T, H, N], states [B or S, H, N, N])."""
    return _forward(_wkv7_chunk, [r, w, k, v, a, b], [], initial_state, cu_seqlens, chunk)


def wkv7_chunked_backward(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                          initial_state: Tensor | None, cu_seqlens: Tensor | None,
                          grad_y: Tensor | None, grad_state: Tensor | None,
                          chunk: int = CHUNK) -> tuple[Tensor, ...]:
    """Gradients of <y, grad_y> + <final_state, grad_state> (None: zeros), by chunks.

    Returns (dr, dw, dk, dv, da, db) [B, T, H, N] in the inputs' dtype and d initial_state
    [B or S, H, N, N] in the state dtype (returned even when initial_state is None: zeros then
    stood for it).
    """
    return _backward(_wkv7_chunk, _wkv7_chunk_backward, [r, w, k, v, a, b], [], initial_state,
                     cu_seqlens, grad_y, grad_state, chunk)


def wkv6_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
                 initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                 chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """WKV-6 by chunks; arguments and results as :func:`arwkv_ext.reference.wkv6_reference`."""
    return _forward(_wkv6_chunk, [r, w, k, v], [u], initial_state, cu_seqlens, chunk)


def wkv6_chunked_backward(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
                          initial_state: Tensor | None, cu_seqlens: Tensor | None,
                          grad_y: Tensor | None, grad_state: Tensor | None,
                          chunk: int = CHUNK) -> tuple[Tensor, ...]:
    """Gradients by chunks: (dr, dw, dk, dv) [B, T, H, N], du [H, N], d initial_state."""
    return _backward(_wkv6_chunk, _wkv6_chunk_backward, [r, w, k, v], [u], initial_state,
                     cu_seqlens, grad_y, grad_state, chunk)
