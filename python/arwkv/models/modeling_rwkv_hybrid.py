"""The ARWKV student: a Transformer decoder whose self-attentions are RWKV-7 (or RWKV-6) time
mixers.

Layer (the architecture of the ARWKV paper, Lin et al. 2025: the teacher's decoder layer with
its self-attention replaced by time mixing)::

    h = h + TimeMix(RMSNorm_in(h));  h = h + MLP(RMSNorm_post(h))      # MLP and norms: the teacher's

Parameter names follow the published ``rwkv_hybrid`` layout
(``model.layers.N.self_attn.time_mixer.*``). The recurrence runs through
``torch.ops.arwkv.wkv7`` for a whole sequence (prefill, training; packed sequences through
``cu_seqlens``) and for decoding one token at a time with a carried state, so memory per
generated token is constant.
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

import arwkv_ext

from .configuration_rwkv_hybrid import RwkvHybridConfig

Tensor = torch.Tensor


@dataclass
class LayerState:
    """What one time mixer carries between calls: the last input token (for the token shift)
    and the WKV state."""

    shift: Tensor  # [B, C], the normed input of the last token
    wkv: Tensor    # [B, H, N, N] float32


class RwkvHybridCache:
    """The cache of generate(): one LayerState per time-mixing layer, whatever the context length
    (constant memory); in hybrids, the keys and values of the attention layers the student kept
    (growing with the context, as the teacher's); and how many tokens it has seen."""

    def __init__(self, layers: list[LayerState | None] | None = None, seen_tokens: int = 0) -> None:
        self.layers = layers
        self.seen_tokens = seen_tokens
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def update(self, key: Tensor, value: Tensor, layer_idx: int, **kwargs) -> tuple[Tensor, Tensor]:
        """Called by a kept attention layer: appends [B, H_kv, T, d] keys/values, returns all."""
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the rows of the beams that survive."""
        for st in self.layers or []:
            if st is not None:
                st.shift = st.shift.index_select(0, beam_idx.to(st.shift.device))
                st.wkv = st.wkv.index_select(0, beam_idx.to(st.wkv.device))
        for store in (self.keys, self.values):
            for i, t in store.items():
                store[i] = t.index_select(0, beam_idx.to(t.device))


@dataclass
class RwkvHybridCausalLMOutput(ModelOutput):
    """loss (with labels), logits [B, T, V], and the cache after the last token."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: RwkvHybridCache | None = None


def some_names(names: list[str], shown: int = 4) -> str:
    """The first ``shown`` of ``names``, and how many more there are (for one-line messages)."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def teacher_classes(model_type: str, kept_attention: bool = False) -> dict[str, type]:
    """The MLP and RMSNorm classes (and, for hybrids that keep attention layers, the Attention
    and RotaryEmbedding classes) of a transformers decoder family (qwen2, llama, mistral, qwen3,
    ...), so the student computes them exactly as the teacher does."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as err:
        raise ValueError(f"rwkv_hybrid: teacher model_type {model_type!r} is not a transformers "
                         "model") from err
    found = {}
    for suffix in ("MLP", "RMSNorm") + (("Attention", "RotaryEmbedding") if kept_attention else ()):
        names = [n for n, obj in vars(module).items()
                 if n.endswith(suffix) and isinstance(obj, type) and obj.__module__ == module.__name__]
        if len(names) != 1:
            raise ValueError(f"rwkv_hybrid: teacher model_type {model_type!r} has no single *{suffix} class "
                             "(a decoder with the standard layout is required)")
        found[suffix] = getattr(module, names[0])
    return found


def _orthogonal(rows: int, cols: int, scale: float) -> Tensor:
    # float32 whatever the default dtype (QR has no 16-bit CPU kernel; vLLM builds models under
    # a bfloat16 default); copy_ casts to the parameter's dtype
    w = torch.empty(rows, cols, dtype=torch.float32)
    nn.init.orthogonal_(w)
    return w * scale


def token_shift(x: Tensor, state: LayerState | None, cu_seqlens: Tensor | None,
                keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """x [B, T, C] with padding zeroed (keep [B, T, 1]), and xx = shift(x) - x, where shift(x)_t =
    x_{t-1}: at t = 0 the carried last token (zeros without a state); with cu_seqlens (B = 1) at
    the start of each packed sequence s its carried token ``state.shift[s]`` (zeros without)."""
    B, T, C = x.shape
    if keep is not None:
        x = x * keep
    if cu_seqlens is None:
        prev = state.shift.unsqueeze(1) if state is not None else x.new_zeros(B, 1, C)
        shifted = torch.cat([prev, x[:, :-1]], dim=1)
    else:
        shifted = torch.cat([x.new_zeros(B, 1, C), x[:, :-1]], dim=1)
        shifted[:, cu_seqlens[:-1].long()] = state.shift.to(x.dtype) if state is not None else 0
    return x, shifted - x


def last_tokens(x: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """The token shift's carried state: x [B, T, C] -> its last token [B, C], or with cu_seqlens
    (B = 1) the last token of each packed sequence [S, C]."""
    last = x[:, -1] if cu_seqlens is None else x[0, cu_seqlens[1:].long() - 1]
    return last.detach().clone()


class TimeMixerBase(nn.Module):
    """What the RWKV-7 and RWKV-6 time mixers share: their sizes, the four projections a
    teacher's q/k/v/o can initialise, and the optional per-head GroupNorm."""

    def __init__(self, config: RwkvHybridConfig, layer_idx: int) -> None:
        super().__init__()
        C, D, N = config.hidden_size, config.attention_hidden_size, config.head_size
        self.layer_idx, self.num_layers = layer_idx, config.num_hidden_layers
        self.hidden_size, self.head_size, self.num_heads = C, N, D // N
        self.has_gate, self.has_group_norm = config.wkv_has_gate, config.wkv_has_group_norm
        bias = config.wkv_qkv_bias
        self.receptance = nn.Linear(C, D, bias=bias)
        self.key = nn.Linear(C, D, bias=bias)
        self.value = nn.Linear(C, D, bias=bias)
        self.output = nn.Linear(D, C, bias=False)
        if self.has_group_norm:
            self.ln_x = nn.GroupNorm(self.num_heads, D, eps=1e-5 * config.head_size_divisor**2)

    def reset_rwkv_parameters(self) -> None:
        raise NotImplementedError


class Rwkv7TimeMixer(TimeMixerBase):
    """RWKV-7 time mixing for a [B, T, C] input, with D = attention_hidden_size = H * N."""

    def __init__(self, config: RwkvHybridConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        C, D, N = config.hidden_size, config.attention_hidden_size, config.head_size

        def vec(n: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(1, 1, n))

        # token-shift mixes
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a = vec(C), vec(C), vec(C), vec(C), vec(C)
        # decay, in-context learning rate, value residual: bias + low-rank
        self.w0, self.w1, self.w2 = vec(D), nn.Parameter(torch.zeros(C, config.decay_low_rank)), \
            nn.Parameter(torch.zeros(config.decay_low_rank, D))
        self.a0, self.a1, self.a2 = vec(D), nn.Parameter(torch.zeros(C, config.a_low_rank)), \
            nn.Parameter(torch.zeros(config.a_low_rank, D))
        self.v0, self.v1, self.v2 = vec(D), nn.Parameter(torch.zeros(C, config.v_low_rank)), \
            nn.Parameter(torch.zeros(config.v_low_rank, D))
        if self.has_gate:
            self.x_g = vec(C)
            self.g1 = nn.Parameter(torch.zeros(C, config.gate_low_rank))
            self.g2 = nn.Parameter(torch.zeros(config.gate_low_rank, D))
        self.k_k, self.k_a = vec(D), vec(D)
        self.r_k = nn.Parameter(torch.zeros(self.num_heads, N))
        self.reset_rwkv_parameters()

    @torch.no_grad()
    def reset_rwkv_parameters(self) -> None:
        """The initial values of the RWKV-7 reference code (BlinkDL's RWKV-LM, as ARWKV uses them)
        for everything but the four C x D projections (those keep nn.Linear's default or are
        copied from a teacher)."""
        C, D = self.hidden_size, self.w0.shape[-1]
        L, layer = self.num_layers, self.layer_idx
        r0 = layer / (L - 1) if L > 1 else 0.0
        r1 = 1.0 - layer / L
        ddd = torch.arange(C, dtype=torch.float64) / C
        self.x_r.copy_((1 - ddd ** (0.2 * r1)).view(1, 1, C))
        self.x_w.copy_((1 - ddd ** (0.9 * r1)).view(1, 1, C))
        self.x_k.copy_((1 - (ddd ** (0.9 * r1) + 0.4 * r0)).view(1, 1, C))
        self.x_v.copy_((1 - (ddd ** (0.4 * r1) + 0.6 * r0)).view(1, 1, C))
        self.x_a.copy_((1 - ddd ** (0.9 * r1)).view(1, 1, C))
        n = torch.arange(D, dtype=torch.float64)
        self.w0.copy_((-7 + 5 * (n / max(D - 1, 1)) ** (0.85 + r0**0.5) + 0.5).view(1, 1, D))
        self.w1.zero_()
        self.w2.copy_(_orthogonal(*self.w2.shape, 0.1))
        self.a0.zero_()
        self.a1.zero_()
        self.a2.copy_(_orthogonal(*self.a2.shape, 0.1))
        self.v0.fill_(1.0)
        self.v1.zero_()
        self.v2.copy_(_orthogonal(*self.v2.shape, 0.1))
        if self.has_gate:
            self.x_g.copy_((1 - ddd ** (0.2 * r1)).view(1, 1, C))
            self.g1.zero_()
            self.g2.copy_(_orthogonal(*self.g2.shape, 0.1))
        self.k_k.fill_(0.85)
        self.k_a.fill_(1.0)
        self.r_k.zero_()

    def forward(self, x: Tensor, state: LayerState | None = None, v_first: Tensor | None = None,
                cu_seqlens: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, LayerState, Tensor]:
        """x: [B, T, C] (normed). state: carried from the previous call (None: zeros).
        v_first: layer 0's values [B, T, D] (None in layer 0). cu_seqlens: int [S + 1] packing S
        sequences along T (B = 1, no carried state). mask: [B, T], 0 at (left) padding, which
        then leaves the state exactly as it was.

        Returns the output [B, T, C], the state after the last token, and v_first.
        """
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        keep = None if mask is None else mask.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
        x, xx = token_shift(x, state, cu_seqlens, keep)
        xr, xw, xk, xv, xa = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a))

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5  # decay exp(-exp(w))
        if v_first is None:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        log_decay = -torch.exp(w.float()).to(x.dtype)
        if keep is not None:  # padding: decay 1, nothing written, nothing removed
            k, v, log_decay = k * keep, v * keep, log_decay * keep
            kk = kk * keep.unsqueeze(-1)

        # one dtype for the op: under autocast the projections come out in 16 bits, the
        # float32 mixes (decay, a, kk) must follow them
        dt = r.dtype
        rh, kh, vh, ah = (t.view(B, T, H, N).to(dt) for t in (r, k, v, a))
        log_decay, kk = log_decay.view(B, T, H, N).to(dt), kk.to(dt)
        y, wkv = arwkv_ext.wkv7(rh, log_decay, kh, vh, -kk, kk * ah,
                                state.wkv if state is not None else None, cu_seqlens)
        y = y.reshape(B, T, H * N)
        if self.has_group_norm:
            y = self.ln_x(y.view(B * T, H * N)).view(B, T, H * N)
        bonus = (rh * kh * self.r_k).sum(dim=-1, keepdim=True) * vh
        y = y + bonus.reshape(B, T, H * N)
        if self.has_gate:
            xg = x + xx * self.x_g
            y = y * (torch.sigmoid(xg @ self.g1) @ self.g2)
        return self.output(y), LayerState(shift=last_tokens(x, cu_seqlens), wkv=wkv), v_first


class Rwkv6TimeMixer(TimeMixerBase):
    """RWKV-6 time mixing, stock parameter names: data-dependent token shift (a 5-way low-rank
    mixer), decay d = exp(-exp(time_decay + tanh(x W1) W2)), optional GroupNorm, in one of two
    recurrences (``config.wkv6_form``), per head with state S [N, N]:

    - "finch": y_t = r_t (S_{t-1} + diag(u) k_t^T v_t), S_t = diag(d_t) S_{t-1} + k_t^T v_t, with the
      per-head bonus u = ``time_faaaa`` [H, N]; gate silu(x_g Wg).
    - "qrwkv": S_t = diag(d_t) S_{t-1} + (k_t (1 - d_t))^T v_t, y_t = r_t S_t / sqrt(N); no bonus;
      gate sigmoid(x_g Wg) (what llama.cpp's rwkv6qwen2 computes).
    """

    def __init__(self, config: RwkvHybridConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        C, D, N = config.hidden_size, config.attention_hidden_size, config.head_size
        self.mix_rank, self.decay_rank = config.lora_rank_tokenshift, config.lora_rank_decay
        for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * self.mix_rank))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, self.mix_rank, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, D))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, self.decay_rank))
        self.time_decay_w2 = nn.Parameter(torch.zeros(self.decay_rank, D))
        self.form = config.wkv6_form
        if self.form == "finch":
            self.time_faaaa = nn.Parameter(torch.zeros(self.num_heads, N))
        if self.has_gate:
            self.gate = nn.Linear(C, D, bias=False)
        self.reset_rwkv_parameters()

    @torch.no_grad()
    def reset_rwkv_parameters(self) -> None:
        """The stock RWKV-6 initial values (the projections keep theirs or the teacher's)."""
        C, D = self.hidden_size, self.time_decay.shape[-1]
        L, layer = self.num_layers, self.layer_idx
        r0 = layer / (L - 1) if L > 1 else 0.0
        r1 = 1.0 - layer / L
        ddd = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
        self.time_maa_x.copy_(1 - ddd**r1)
        self.time_maa_w.copy_(1 - ddd**r1)
        self.time_maa_k.copy_(1 - ddd**r1)
        self.time_maa_v.copy_(1 - (ddd**r1 + 0.3 * r0))
        self.time_maa_r.copy_(1 - ddd ** (0.5 * r1))
        self.time_maa_g.copy_(1 - ddd ** (0.5 * r1))
        self.time_maa_w1.zero_()
        self.time_maa_w2.uniform_(-0.01, 0.01)
        n = torch.arange(D, dtype=torch.float64)
        self.time_decay.copy_((-6 + 5 * (n / max(D - 1, 1)) ** (0.7 + 1.3 * r0)).view(1, 1, D))
        self.time_decay_w1.zero_()
        self.time_decay_w2.uniform_(-0.01, 0.01)
        if self.form == "finch":
            bonus = r0 * (1 - n / max(D - 1, 1)) + ((n + 1) % 3 - 1) * 0.1
            self.time_faaaa.copy_(bonus.view(self.num_heads, self.head_size))

    def forward(self, x: Tensor, state: LayerState | None = None, v_first: Tensor | None = None,
                cu_seqlens: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, LayerState, Tensor | None]:
        """As Rwkv7TimeMixer.forward; v_first passes through untouched (no value residual)."""
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        keep = None if mask is None else mask.to(x.dtype).unsqueeze(-1)
        x, xx = token_shift(x, state, cu_seqlens, keep)
        mixed = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B * T, 5, self.mix_rank)
        mixed = torch.bmm(mixed.transpose(0, 1), self.time_maa_w2).view(5, B, T, C)
        mw, mk, mv, mr, mg = mixed.unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        r = self.receptance(x + xx * (self.time_maa_r + mr))
        k = self.key(x + xx * (self.time_maa_k + mk))
        v = self.value(x + xx * (self.time_maa_v + mv))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_decay = -torch.exp(w.float()).to(x.dtype)
        if keep is not None:  # padding: decay 1, nothing written
            k, v, log_decay = k * keep, v * keep, log_decay * keep
        initial = state.wkv if state is not None else None
        if self.form == "finch":
            heads = [t.reshape(B, T, H, N).to(r.dtype) for t in (r, log_decay, k, v)]  # one dtype (autocast)
            y, wkv = arwkv_ext.wkv6(*heads, self.time_faaaa.to(r.dtype), initial, cu_seqlens)
        else:
            y, wkv = self._read_after_update(r, log_decay, k, v, initial, cu_seqlens)
        y = y.reshape(B, T, H * N)
        if self.has_group_norm:
            y = self.ln_x(y.view(B * T, H * N)).view(B, T, H * N)
        if self.has_gate:
            gate = self.gate(x + xx * (self.time_maa_g + mg))
            y = y * (F.silu(gate) if self.form == "finch" else torch.sigmoid(gate))
        return self.output(y), LayerState(shift=last_tokens(x, cu_seqlens), wkv=wkv), v_first


    def _read_after_update(self, r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, initial: Tensor | None,
                           cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
        """The "qrwkv" recurrence on the WKV-6 op, exactly: r, log_decay, k, v [B, T, D] ->
        y [B, T, H, N] and the state [B, H, N, N]. With k' = k (1 - d), reading after the update
        splits as y_t = (r_t d_t) S_{t-1} + (r_t . k'_t) v_t (per head): the op with receptance
        r d and no bonus gives the first term and the same state; the second is added here."""
        B, T, D = r.shape
        H, N = self.num_heads, self.head_size
        dt = r.dtype  # one dtype for the op (under autocast the projections are 16-bit)
        log_decay = log_decay.to(dt)  # the decay the op applies, in k' and r d too
        decay = torch.exp(log_decay.float())
        rh = (r.float() * decay * N**-0.5).view(B, T, H, N).to(dt)
        kh = (k.float() * -torch.expm1(log_decay.float())).view(B, T, H, N).to(dt)
        vh = v.view(B, T, H, N).to(dt)
        y, wkv = arwkv_ext.wkv6(rh, log_decay.view(B, T, H, N), kh, vh, rh.new_zeros(H, N), initial,
                                cu_seqlens)
        this_token = (r.view(B, T, H, N) * N**-0.5 * kh).sum(-1, keepdim=True) * vh
        return y + this_token.to(y.dtype), wkv


def time_mixer_class(config: RwkvHybridConfig) -> type[nn.Module]:
    return {7: Rwkv7TimeMixer, 6: Rwkv6TimeMixer}[config.wkv_version]


class RwkvHybridAttention(nn.Module):
    """Holds the time mixer where the teacher had its self-attention (``self_attn.time_mixer``)."""

    def __init__(self, config: RwkvHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.time_mixer = time_mixer_class(config)(config, layer_idx)

    def forward(self, *args, **kwargs):
        return self.time_mixer(*args, **kwargs)


class RwkvHybridDecoderLayer(nn.Module):
    """The teacher's decoder layer with time mixing in place of self-attention, or (a layer a
    hybrid keeps) with the teacher's own attention."""

    def __init__(self, config: RwkvHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_wkv = config.is_wkv_layer(layer_idx)
        classes = teacher_classes(config.teacher_model_type, kept_attention=not self.is_wkv)
        self.input_layernorm = classes["RMSNorm"](config.hidden_size, eps=config.rms_norm_eps)
        if self.is_wkv:
            self.self_attn = RwkvHybridAttention(config, layer_idx)
        else:
            self.self_attn = classes["Attention"](config, layer_idx)
        self.post_attention_layernorm = classes["RMSNorm"](config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = classes["MLP"](config)

    def forward(self, h: Tensor, state: LayerState | None, v_first: Tensor | None, cu_seqlens: Tensor | None,
                mask: Tensor | None,
                attention: AttentionInputs | None) -> tuple[Tensor, LayerState | None, Tensor]:
        """h [B, T, C]. Packed rows (cu_seqlens over the B * T tokens, every row starting a
        sequence): the time mixer runs them as one sequence [1, B * T, C]; kept attention runs
        them per row with a block-diagonal mask, or as one sequence on a variable-length path."""
        x = self.input_layernorm(h)
        B, T, C = x.shape
        if self.is_wkv:
            flat = cu_seqlens is not None and B > 1
            mixed, state, v_first = self.self_attn(x.reshape(1, B * T, C) if flat else x, state, v_first,
                                                   cu_seqlens, mask)
            mixed = mixed.view(B, T, C)
        else:
            mixed = self.self_attn(x.reshape(1, B * T, C) if attention.flat else x, **attention.kwargs)[0]
            mixed = mixed.view(B, T, C)
        h = h + mixed
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, state, v_first


@dataclass
class AttentionInputs:
    """What the kept attention layers of a hybrid take besides their input: ``kwargs`` for the
    teacher family's Attention (position_embeddings, attention_mask, cache, and the
    variable-length kwargs of flash attention), and whether the [B, T, C] input goes in as
    one packed sequence [1, B * T, C] (``flat``: flash attention's variable-length path)."""

    kwargs: dict
    flat: bool = False


def packed_positions(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For ``total`` packed tokens split by cu_seqlens [S + 1]: each token's sequence index and
    its position inside that sequence (both [total], int64)."""
    tokens = torch.arange(total, device=cu_seqlens.device)
    starts = cu_seqlens.long()
    sequence = torch.searchsorted(starts[1:], tokens, right=True)
    return sequence, tokens - starts[sequence]


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """allowed [B, T, S] (query t may attend to key s) -> the additive mask [B, 1, T, S] that
    transformers' eager and sdpa attention take: 0 where allowed, the dtype's minimum elsewhere."""
    additive = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


class RwkvHybridPreTrainedModel(PreTrainedModel):
    config_class = RwkvHybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["RwkvHybridDecoderLayer"]
    # the kept attention layers of a hybrid run through transformers' attention functions:
    # attn_implementation="eager" / "sdpa" / "flash_attention_2" chooses among them
    _supports_sdpa = True
    _supports_flash_attn = True
    supports_gradient_checkpointing = True  # gradient_checkpointing_enable() sets the model's flag

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults (linears, embeddings, norms, rotary buffers of kept attention
        layers), then ARWKV's initial values for the time mixers, whose four projections keep
        nn.Linear's own initialisation (a mixer is visited after its linears)."""
        super()._init_weights(module)
        if isinstance(module, TimeMixerBase):
            # Only what a checkpoint did not provide gets initial values: the reset below
            # rewrites the whole mixer, so the loaded tensors (flagged by transformers) go back.
            loaded = {name: p.detach().clone() for name, p in module.named_parameters()
                      if getattr(p, "_is_hf_initialized", False)}
            module.reset_rwkv_parameters()
            for linear in (module.receptance, module.key, module.value, module.output):
                linear.reset_parameters()
            with torch.no_grad():
                for name, value in loaded.items():
                    module.get_parameter(name).copy_(value)


class RwkvHybridModel(RwkvHybridPreTrainedModel):
    def __init__(self, config: RwkvHybridConfig) -> None:
        super().__init__(config)
        hybrid = not all(config.is_wkv_layer(i) for i in range(config.num_hidden_layers))
        classes = teacher_classes(config.teacher_model_type, kept_attention=hybrid)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(RwkvHybridDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = classes["RMSNorm"](config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = classes["RotaryEmbedding"](config) if hybrid else None
        # the keyword the kept attention takes its cache by: "cache" from transformers 5.24,
        # "past_key_values" before (vLLM 0.32 pins transformers < 5.20)
        takes = inspect.signature(classes["Attention"].forward).parameters if hybrid else {}
        self.cache_keyword = "past_key_values" if "past_key_values" in takes else "cache"
        self.gradient_checkpointing = False  # recompute each layer in the backward when training
        self.post_init()

    def forward(self, input_ids: Tensor, cache: RwkvHybridCache | None = None,
                cu_seqlens: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, list[LayerState | None]]:
        """input_ids: [B, T]; cache: what earlier calls left (its recurrent states are read, its
        attention keys/values extended in place); attention_mask: [B, past + T] (or [B, T]) with
        0 at left padding; cu_seqlens: int [S + 1], S sequences packed along the B * T tokens
        (each row starting one; no cache, no attention_mask). Returns the final hidden states
        [B, T, C] and the per-layer recurrent state after the last token (None for kept
        attention layers)."""
        B, T = input_ids.shape
        state = cache.layers if cache is not None else None
        if cu_seqlens is not None:
            self._check_packed(cu_seqlens, B, T, cache, attention_mask)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask[:, -T:]
        attention = None
        if self.rotary_emb is not None:
            attention = (self._packed_attention_inputs(cu_seqlens, B, T) if cu_seqlens is not None
                         else self._attention_inputs(input_ids, cache, attention_mask))
        h = self.embed_tokens(input_ids)
        v_first, new_state = None, []
        for i, layer in enumerate(self.layers):
            layer_state = state[i] if state is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, s, v_first = checkpoint(layer, h, layer_state, v_first, cu_seqlens, mask, attention,
                                           use_reentrant=False)
            else:
                h, s, v_first = layer(h, layer_state, v_first, cu_seqlens, mask, attention)
            new_state.append(s)
        return self.norm(h), new_state

    @staticmethod
    def _check_packed(cu_seqlens: Tensor, B: int, T: int, cache: RwkvHybridCache | None,
                      attention_mask: Tensor | None) -> None:
        """Packed rows start from zero state, without padding masks, and (B > 1) every row
        starts a sequence: nothing may flow from one row into the next."""
        if cache is not None and (cache.layers is not None or cache.keys):
            raise ValueError("rwkv_hybrid: packed sequences (cu_seqlens) start from zero state: "
                             "pass no cache")
        if attention_mask is not None:
            raise ValueError("rwkv_hybrid: packed sequences (cu_seqlens) take no attention_mask "
                             "(padding is a sequence of its own)")
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != B * T:
            raise ValueError(f"rwkv_hybrid: cu_seqlens must run from 0 to {B * T} (the B * T tokens "
                             f"of input_ids [{B}, {T}]), got {int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}")
        if B > 1:
            row_starts = torch.arange(0, B * T, T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
            if not bool(torch.isin(row_starts, cu_seqlens).all()):
                raise ValueError(f"rwkv_hybrid: packed rows of input_ids [{B}, {T}] must each start a "
                                 "sequence (cu_seqlens must hold every multiple of T)")

    def _packed_attention_inputs(self, cu_seqlens: Tensor, B: int, T: int) -> AttentionInputs:
        """Kept attention on packed rows: no attention across sequence boundaries, positions
        restarting at each sequence, so each sequence is computed as it would be alone. Flash
        attention takes the sequences as one variable-length batch; the other implementations
        (eager, sdpa) a block-diagonal causal mask per row [B, 1, T, T]."""
        sequence, positions = packed_positions(cu_seqlens, B * T)
        x = self.embed_tokens.weight[:1].unsqueeze(0)  # only its dtype and device matter
        if self.config._attn_implementation.startswith("flash_attention"):
            cu = cu_seqlens.to(torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            kwargs = {"position_embeddings": self.rotary_emb(x, positions.view(1, B * T)),
                      "attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                      "max_length_q": longest, "max_length_k": longest}
            return AttentionInputs(kwargs, flat=True)
        sequence = sequence.view(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=sequence.device).tril()
        allowed = causal & (sequence[:, :, None] == sequence[:, None, :])  # [B, T, T]
        return AttentionInputs({"position_embeddings": self.rotary_emb(x, positions.view(B, T)),
                                "attention_mask": additive_mask(allowed, x.dtype)})

    def _attention_inputs(self, input_ids: Tensor, cache: RwkvHybridCache | None,
                          attention_mask: Tensor | None) -> AttentionInputs:
        """Rotary embeddings and an additive causal + padding mask [B, 1, T, past + T] for the
        attention layers a hybrid keeps (positions count real tokens only, so a left-padded row
        sees the positions it would alone)."""
        B, T = input_ids.shape
        past = cache.seen_tokens if cache is not None else 0
        full = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask is not None:
            full[:, -attention_mask.shape[1]:] = attention_mask.to(full.dtype)
        position_ids = (full.cumsum(-1) - 1).clamp(min=0)[:, -T:]
        keys, queries = torch.arange(past + T, device=full.device), past + torch.arange(T, device=full.device)
        causal = keys[None, :] <= queries[:, None]
        allowed = causal[None, :, :] & full[:, None, :].bool()  # [B, T, past + T]
        x = self.embed_tokens.weight[:1].unsqueeze(0)  # only its dtype and device matter
        return AttentionInputs({"position_embeddings": self.rotary_emb(x, position_ids),
                                "attention_mask": additive_mask(allowed, x.dtype), self.cache_keyword: cache})


class RwkvHybridForCausalLM(RwkvHybridPreTrainedModel, GenerationMixin):
    # With tie_word_embeddings (as in the published small configs, whose checkpoints hold no
    # lm_head tensor) the output layer is the input embedding, as transformers ties it for the
    # teacher; arwkv convert writes untied students (tie_word_embeddings false, two tensors).
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RwkvHybridConfig) -> None:
        super().__init__(config)
        self.model = RwkvHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, and one warning line naming the tensors a checkpoint
        lacks (they get initial values; the loaded ones are kept) or has in excess (ignored)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = []
        kinds = (("missing_keys", "missing (initialised anew)"), ("unexpected_keys", "unexpected (ignored)"))
        for kind, what in kinds:
            names = sorted(info.get(kind) or ())
            if names:
                problems.append(f"{len(names)} {what}: {some_names(names)}")
        if problems:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            warnings.warn(f"rwkv_hybrid: {source}: tensors {'; '.join(problems)}", stacklevel=2)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """transformers' save_pretrained, then the weight files made readable as the umask allows:
        safetensors writes them private (0600), unlike every other file of the checkpoint."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            mask = os.umask(0)
            os.umask(mask)
            for weights in Path(save_directory).glob("*.safetensors"):
                os.chmod(weights, 0o666 & ~mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cache: RwkvHybridCache | None = None, use_cache: bool | None = None,
                labels: Tensor | None = None, cu_seqlens: Tensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> RwkvHybridCausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (0 at left padding); cache: continue from
        it (updated in place and returned); labels [B, T]: next-token cross-entropy (-100 is
        ignored); cu_seqlens [S + 1]: S sequences packed along the B * T tokens, each row
        starting one (the loss still runs across them: give -100 labels at sequence starts).
        logits_to_keep > 0 keeps the last ones.
        """
        if use_cache is not False and cache is None and self.model.rotary_emb is not None:
            cache = RwkvHybridCache()  # kept attention layers append their keys/values to it
        h, new_state = self.model(input_ids, cache, cu_seqlens, attention_mask)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        if use_cache is not False:
            cache = cache if cache is not None else RwkvHybridCache()
            cache.layers, cache.seen_tokens = new_state, cache.seen_tokens + input_ids.shape[1]
        return RwkvHybridCausalLMOutput(loss=loss, logits=logits,
                                        cache=cache if use_cache is not False else None)

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: RwkvHybridCache | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict:
        """After the prompt, only the tokens the cache has not seen go in (one per step)."""
        if cache is not None and cache.seen_tokens > 0:
            input_ids = input_ids[:, cache.seen_tokens:]  # the full mask stays: kept attention reads it
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache,
                "use_cache": use_cache, "logits_to_keep": kwargs.get("logits_to_keep", 0)}


# save_pretrained then writes auto_map and copies this file beside the weights, so
# AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) loads the student.
RwkvHybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")
