"""The ARWKV student: a Transformer decoder whose self-attentions are RWKV-7 time mixers.

Layer (arwkv-method.md section 2)::

    h = h + TimeMix(RMSNorm_in(h));  h = h + MLP(RMSNorm_post(h))      # MLP and norms: the teacher's

Parameter names follow the published ``rwkv_hybrid`` layout
(``model.layers.N.self_attn.time_mixer.*``). The recurrence runs through
``torch.ops.arwkv.wkv7`` for a whole sequence (prefill, training; packed sequences through
``cu_seqlens``) and for decoding one token at a time with a carried state, so memory per
generated token is constant.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

import arwkv_ext

from .configuration_rwkv_hybrid import RwkvHybridConfig

Tensor = torch.Tensor


@dataclass
class LayerState:
    """What one time mixer carries between calls: the last input token (for the token shift)
    and the WKV state."""

    shift: Tensor  # [B, C], the normed input of the last token
    wkv: Tensor    # [B, H, N, N] float32


def teacher_classes(model_type: str) -> tuple[type, type]:
    """The MLP and RMSNorm classes of a transformers decoder family (qwen2, llama, mistral, qwen3,
    ...), so the student computes them exactly as the teacher does."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as err:
        raise ValueError(f"rwkv_hybrid: teacher model_type {model_type!r} is not a transformers "
                         "model") from err
    found = {}
    for suffix in ("MLP", "RMSNorm"):
        names = [n for n, obj in vars(module).items()
                 if n.endswith(suffix) and isinstance(obj, type) and obj.__module__ == module.__name__]
        if len(names) != 1:
            raise ValueError(f"rwkv_hybrid: teacher model_type {model_type!r} has no single *{suffix} class "
                             "(a decoder with the standard layout is required)")
        found[suffix] = getattr(module, names[0])
    return found["MLP"], found["RMSNorm"]


def _orthogonal(rows: int, cols: int, scale: float) -> Tensor:
    w = torch.empty(rows, cols)
    nn.init.orthogonal_(w)
    return w * scale


class Rwkv7TimeMixer(nn.Module):
    """RWKV-7 time mixing for a [B, T, C] input, with D = attention_hidden_size = H * N."""

    def __init__(self, config: RwkvHybridConfig, layer_idx: int) -> None:
        super().__init__()
        C, D, N = config.hidden_size, config.attention_hidden_size, config.head_size
        self.layer_idx, self.num_layers = layer_idx, config.num_hidden_layers
        self.hidden_size, self.head_size, self.num_heads = C, N, D // N
        self.has_gate, self.has_group_norm = config.wkv_has_gate, config.wkv_has_group_norm

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
        bias = config.wkv_qkv_bias
        self.receptance = nn.Linear(C, D, bias=bias)
        self.key = nn.Linear(C, D, bias=bias)
        self.value = nn.Linear(C, D, bias=bias)
        self.output = nn.Linear(D, C, bias=False)
        if self.has_group_norm:
            self.ln_x = nn.GroupNorm(self.num_heads, D, eps=1e-5 * config.head_size_divisor**2)
        self.reset_rwkv_parameters()

    @torch.no_grad()
    def reset_rwkv_parameters(self) -> None:
        """The reference code's initial values (arwkv-method.md section 2) for everything but the
        four C x D projections (those keep nn.Linear's default or are copied from a teacher)."""
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
                cu_seqlens: Tensor | None = None) -> tuple[Tensor, LayerState, Tensor]:
        """x: [B, T, C] (normed). state: carried from the previous call (None: zeros).
        v_first: layer 0's values [B, T, D] (None in layer 0). cu_seqlens: int [S + 1] packing S
        sequences along T (B = 1, no carried state).

        Returns the output [B, T, C], the state after the last token, and v_first.
        """
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        if cu_seqlens is None:
            prev = state.shift.unsqueeze(1) if state is not None else x.new_zeros(B, 1, C)
            shifted = torch.cat([prev, x[:, :-1]], dim=1)
        else:  # every packed sequence starts from a zero token shift
            shifted = torch.cat([x.new_zeros(B, 1, C), x[:, :-1]], dim=1)
            starts = cu_seqlens[:-1].long()
            shifted[:, starts] = 0
        xx = shifted - x
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

        heads = [t.view(B, T, H, N) for t in (r, k, v, a)]
        rh, kh, vh, ah = heads
        log_decay = -torch.exp(w.float()).to(x.dtype).view(B, T, H, N)
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
        return self.output(y), LayerState(shift=x[:, -1].detach().clone(), wkv=wkv), v_first


class RwkvHybridAttention(nn.Module):
    """Holds the time mixer where the teacher had its self-attention (``self_attn.time_mixer``)."""

    def __init__(self, config: RwkvHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.time_mixer = Rwkv7TimeMixer(config, layer_idx)

    def forward(self, *args, **kwargs):
        return self.time_mixer(*args, **kwargs)


class RwkvHybridDecoderLayer(nn.Module):
    def __init__(self, config: RwkvHybridConfig, layer_idx: int) -> None:
        super().__init__()
        mlp_cls, norm_cls = teacher_classes(config.teacher_model_type)
        self.input_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = RwkvHybridAttention(config, layer_idx)
        self.post_attention_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = mlp_cls(config)

    def forward(self, h: Tensor, state: LayerState | None, v_first: Tensor | None,
                cu_seqlens: Tensor | None) -> tuple[Tensor, LayerState, Tensor]:
        mixed, state, v_first = self.self_attn(self.input_layernorm(h), state, v_first, cu_seqlens)
        h = h + mixed
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, state, v_first


class RwkvHybridPreTrainedModel(PreTrainedModel):
    config_class = RwkvHybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["RwkvHybridDecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, Rwkv7TimeMixer):  # visited after its linears: ARWKV keeps their
            module.reset_rwkv_parameters()         # nn.Linear default init
            for linear in (module.receptance, module.key, module.value, module.output):
                linear.reset_parameters()


class RwkvHybridModel(RwkvHybridPreTrainedModel):
    def __init__(self, config: RwkvHybridConfig) -> None:
        super().__init__(config)
        _, norm_cls = teacher_classes(config.teacher_model_type)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(RwkvHybridDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: Tensor, state: list[LayerState] | None = None,
                cu_seqlens: Tensor | None = None) -> tuple[Tensor, list[LayerState]]:
        """input_ids: [B, T]. Returns the final hidden states [B, T, C] and the per-layer state
        after the last token (pass it back to continue the sequences)."""
        if cu_seqlens is not None and state is not None:
            raise ValueError("rwkv_hybrid: packed sequences (cu_seqlens) start from zero state; "
                             "pass state=None")
        h = self.embed_tokens(input_ids)
        v_first, new_state = None, []
        for i, layer in enumerate(self.layers):
            h, s, v_first = layer(h, state[i] if state is not None else None, v_first, cu_seqlens)
            new_state.append(s)
        return self.norm(h), new_state


class RwkvHybridForCausalLM(RwkvHybridPreTrainedModel):
    def __init__(self, config: RwkvHybridConfig) -> None:
        super().__init__(config)
        self.model = RwkvHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: Tensor, state: list[LayerState] | None = None,
                cu_seqlens: Tensor | None = None) -> tuple[Tensor, list[LayerState]]:
        """Logits [B, T, V] and the state after the last token."""
        h, state = self.model(input_ids, state, cu_seqlens)
        return self.lm_head(h), state


def expand_kv_heads(weight: Tensor, num_kv_heads: int, num_heads: int) -> Tensor:
    """[num_kv_heads * d, ...] -> [num_heads * d, ...], each kv head repeated for the contiguous
    group of query heads it serves (the order of transformers' repeat_kv)."""
    if num_kv_heads == num_heads:
        return weight
    group = num_heads // num_kv_heads
    d = weight.shape[0] // num_kv_heads
    return weight.reshape(num_kv_heads, d, *weight.shape[1:]).repeat_interleave(group, dim=0).reshape(
        num_heads * d, *weight.shape[1:])


def student_config(teacher_config, *, head_size: int = 64, gate: bool = True, group_norm: bool = False,
                   qkv_bias: bool | None = None) -> RwkvHybridConfig:
    """The student's config: the teacher's keys, plus the time mixer's."""
    t = teacher_config.to_dict()
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "_name_or_path"):
        t.pop(key, None)
    heads = teacher_config.num_attention_heads
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // heads
    has_bias = bool(getattr(teacher_config, "attention_bias", teacher_config.model_type == "qwen2"))
    t.update(
        head_size=head_size, head_size_divisor=8, wkv_version=7, wkv_has_gate=gate,
        wkv_has_group_norm=group_norm, wkv_layers=None, teacher_model_type=teacher_config.model_type,
        attention_hidden_size=heads * head_dim, wkv_qkv_bias=has_bias if qkv_bias is None else qkv_bias,
        tie_word_embeddings=False, architectures=["RwkvHybridForCausalLM"],
    )
    return RwkvHybridConfig(**t)


@torch.no_grad()
def student_from_teacher(teacher: PreTrainedModel, *, init: str = "transfer", head_size: int = 64,
                         gate: bool = True, group_norm: bool = False, keep_bias: bool = True,
                         seed: int = 0) -> RwkvHybridForCausalLM:
    """Builds the student of an in-memory teacher (``model.embed_tokens``, ``model.layers[i].
    {self_attn, mlp, input_layernorm, post_attention_layernorm}``, ``model.norm``, ``lm_head``).

    Everything but the attentions is copied bit-exactly (tied embeddings become two tensors).
    ``init="transfer"``: receptance, key, value, output <- q_proj, k_proj, v_proj, o_proj, with
    grouped key/value heads expanded as the teacher uses them; biases kept unless
    ``keep_bias=False``. ``init="fresh"``: ARWKV's initialisation (default nn.Linear init).
    """
    if init not in ("transfer", "fresh"):
        raise ValueError(f"init must be 'transfer' or 'fresh', got {init!r}")
    tcfg = teacher.config
    has_bias = getattr(teacher.model.layers[0].self_attn.q_proj, "bias", None) is not None
    config = student_config(tcfg, head_size=head_size, gate=gate, group_norm=group_norm,
                            qkv_bias=has_bias and keep_bias and init == "transfer")
    torch.manual_seed(seed)
    student = RwkvHybridForCausalLM(config).to(teacher.dtype)

    student.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    student.lm_head.weight.copy_(teacher.lm_head.weight)
    heads = tcfg.num_attention_heads
    kv_heads = getattr(tcfg, "num_key_value_heads", heads) or heads
    for t_layer, s_layer in zip(teacher.model.layers, student.model.layers, strict=True):
        s_layer.mlp.load_state_dict(t_layer.mlp.state_dict())
        s_layer.input_layernorm.load_state_dict(t_layer.input_layernorm.state_dict())
        s_layer.post_attention_layernorm.load_state_dict(t_layer.post_attention_layernorm.state_dict())
        if init == "transfer":
            att, tm = t_layer.self_attn, s_layer.self_attn.time_mixer
            pairs = [(tm.receptance, att.q_proj, False), (tm.key, att.k_proj, True),
                     (tm.value, att.v_proj, True)]
            for dst, src, grouped in pairs:
                expand = (lambda x: expand_kv_heads(x, kv_heads, heads)) if grouped else (lambda x: x)
                dst.weight.copy_(expand(src.weight))
                if dst.bias is not None:
                    dst.bias.copy_(expand(src.bias))
            tm.output.weight.copy_(att.o_proj.weight)
    return student
