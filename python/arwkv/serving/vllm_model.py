"""The arwkv student (``RwkvHybridForCausalLM``) as a vLLM model.

Each layer is the teacher's decoder layer with time mixing in place of its self-attention
(:mod:`arwkv.models.modeling_rwkv_hybrid`); a hybrid keeps some of the teacher's attention layers.
Here:

- a time-mixing layer runs the very module transformers runs (``Rwkv7TimeMixer`` /
  ``Rwkv6TimeMixer``, one implementation of the math) on all scheduled tokens at once: vLLM packs
  the requests along the token axis (prefills and decodes alike), and ``query_start_loc`` is the
  ``cu_seqlens`` of one ``torch.ops.arwkv.wkv7`` / ``wkv6`` call that starts each request from
  its carried state. The state (the last token for the token shift, [1, C] in the model's dtype;
  the WKV state [H, N, N] in float32) lives in vLLM's state cache, one slot per request, read and
  written through the slot indices vLLM gives; a request with no computed tokens starts from
  zeros whatever its slot held. The layer runs inside vLLM's ``vllm::linear_attention`` op, which
  vLLM's torch.compile and CUDA graphs already treat as an attention op (split around, eager).
- kept attention layers are vLLM's own decoder layers of the teacher's family (paged KV cache,
  vLLM's attention backends); the MLPs and norms of time-mixing layers are vLLM's too.
- tensor parallelism splits the time mixers by heads (r, k, v, decay, ... are per head; the output
  projection's partial sums are all-reduced), the rest as vLLM splits the teacher.
- prefix caching: vLLM saves the state at block boundaries and copies it whole (both tensors are
  "temporal" state, no convolution window).

RWKV-7's value residual (each layer mixes in the first time-mixing layer's values) crosses
layers; it is passed through a per-model holder written by the first time-mixing layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.abstract import MambaBase

# Defines vllm::linear_attention, the op vLLM's compilation already splits the graph around and
# runs eagerly; it calls the _forward of the layer registered under the name it is given.
from vllm.model_executor.layers.mamba.linear import minimax_linear_attn  # noqa: F401
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMambaPrefixCaching
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.model_executor.models.utils import (
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..models.configuration_rwkv_hybrid import RwkvHybridConfig
from ..models.modeling_rwkv_hybrid import LayerState, some_names, time_mixer_class
from .vllm_plugin import SERVED_FAMILIES, ServeError

Tensor = torch.Tensor

# The teacher's checkpoint names -> vLLM's stacked parameters (name, shard).
STACKED = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1))


def state_shapes(config: RwkvHybridConfig, tp_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One request's state per time-mixing layer: the token shift's last token [1, C] and the
    WKV state [H / tp, N, N]."""
    return (1, config.hidden_size), (config.num_wkv_heads // tp_size, config.head_size, config.head_size)


def state_dtypes(model_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """The token shift in the model's dtype (it is a normed input), the WKV state in float32 (what
    the kernels accumulate in, whatever the inputs' dtype)."""
    return model_dtype, torch.float32


class ValueResidual:
    """RWKV-7's first-layer values ([1, T, D / tp], or [S, 1, D / tp] in a decode-only step),
    written by the first time-mixing layer of each forward pass and read by the later ones (a
    plain object: no parameter, no buffer)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None


class TimeMixing(nn.Module, MambaBase):
    """A time-mixing layer in vLLM: ``time_mixer`` is transformers' module for this shard's heads
    (parameter names as in the checkpoint: ``self_attn.time_mixer.*``), its state in vLLM's cache."""

    def __init__(self, config: RwkvHybridConfig, layer_idx: int, first: bool, residual: ValueResidual,
                 prefix: str) -> None:
        super().__init__()
        vllm_config = get_current_vllm_config()
        self.prefix, self.layer_idx = prefix, layer_idx
        self.first, self.residual = first, residual
        self.tp_size = get_tensor_model_parallel_world_size()
        shard = copy.copy(config)  # this rank's heads: every per-head tensor is cut along D (or H)
        shard.attention_hidden_size = config.attention_hidden_size // self.tp_size
        self.time_mixer = time_mixer_class(config)(shard, layer_idx)
        self.model_dtype = vllm_config.model_config.dtype
        self.shapes = state_shapes(config, self.tp_size)
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"arwkv vLLM model: duplicate layer name {prefix}")
        context[prefix] = self  # how vllm::linear_attention finds this layer

    # What vLLM's state cache needs to know (MambaBase)
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return self.shapes

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return state_dtypes(self.model_dtype)

    def forward(self, hidden_states: Tensor, output: Tensor, positions: Tensor) -> None:
        """hidden_states [T, C] (normed) -> output [T, C], through vLLM's op (which calls _forward)."""
        torch.ops.vllm.linear_attention(hidden_states, output, positions, self.prefix)

    def _forward(self, hidden_states: Tensor, output: Tensor, positions: Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        if metadata is None:  # a profiling or warm-up pass: no requests, no state
            T, state, cu_seqlens, slots = hidden_states.shape[0], None, None, None
            x = hidden_states.unsqueeze(0)
        else:
            T = metadata.num_prefill_tokens + metadata.num_decode_tokens
            # PAD_SLOT_ID (-1) marks padding rows of a captured batch: they go to block 0, vLLM's
            # null block, which no request owns
            slots = metadata.state_indices_tensor.long().clamp(min=0)
            cu_seqlens = metadata.query_start_loc[: slots.numel() + 1]
            state = self._read_state(slots, cu_seqlens, metadata.seq_lens[: slots.numel()])
            if metadata.num_prefills == 0:
                # decoding only, one token a request: a batch of rows, no packing (cu_seqlens would
                # be checked on the host, which a CUDA graph cannot capture)
                x, cu_seqlens = hidden_states[:T].unsqueeze(1), None  # [S, 1, C]
            else:
                x = hidden_states[:T].unsqueeze(0)  # [1, T, C], requests packed by cu_seqlens
        v_first = None if self.first else self.residual.value
        y, new_state, v_first = self.time_mixer(x, state, v_first, cu_seqlens)
        if self.first:
            self.residual.value = v_first
        if self.tp_size > 1:
            y = tensor_model_parallel_all_reduce(y)
        output[:T] = y.reshape(T, -1)
        output[T:] = 0
        if slots is not None:
            shift, wkv = self.kv_cache
            shift[slots, 0] = new_state.shift.to(shift.dtype)
            wkv[slots] = new_state.wkv

    def _read_state(self, slots: Tensor, cu_seqlens: Tensor, seq_lens: Tensor) -> LayerState:
        """Each request's carried state [S, C] and [S, H, N, N]; zeros for a request whose
        computed tokens are none (its slot may hold an earlier request's state)."""
        shift, wkv = self.kv_cache
        computed = seq_lens - (cu_seqlens[1:] - cu_seqlens[:-1])
        fresh = (computed <= 0).view(-1, 1)
        return LayerState(shift=shift[slots, 0].masked_fill(fresh, 0),
                          wkv=wkv[slots].masked_fill(fresh.view(-1, 1, 1, 1), 0))


class TimeMixingDecoderLayer(nn.Module):
    """The teacher's decoder layer with time mixing in place of self-attention."""

    def __init__(self, config: RwkvHybridConfig, prefix: str, first: bool, residual: ValueResidual) -> None:
        super().__init__()
        quant_config = get_current_vllm_config().quant_config
        layer_idx = extract_layer_index(prefix)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = TimeMixing(config, layer_idx, first, residual, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: Tensor, hidden_states: Tensor,
                residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        mixed = torch.empty_like(hidden_states)
        self.self_attn(hidden_states, mixed, positions)
        hidden_states, residual = self.post_attention_layernorm(mixed, residual)
        return self.mlp(hidden_states), residual


def _qwen2_layer(config, vllm_config, prefix):
    from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
    return Qwen2DecoderLayer(config=config, cache_config=vllm_config.cache_config,
                             quant_config=vllm_config.quant_config, prefix=prefix)


def _qwen3_layer(config, vllm_config, prefix):
    from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
    return Qwen3DecoderLayer(config=config, cache_config=vllm_config.cache_config,
                             quant_config=vllm_config.quant_config, prefix=prefix)


def _llama_layer(config, vllm_config, prefix):
    from vllm.model_executor.models.llama import LlamaDecoderLayer
    return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)


def _mistral_layer(config, vllm_config, prefix):
    from vllm.model_executor.models.mistral import MistralDecoderLayer
    return MistralDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)


# A hybrid's kept attention layers: vLLM's decoder layer of the teacher's family.
KEPT_LAYERS = {"qwen2": _qwen2_layer, "qwen3": _qwen3_layer, "llama": _llama_layer, "mistral": _mistral_layer}
assert set(KEPT_LAYERS) == set(SERVED_FAMILIES)


# the token axis of each input varies from step to step
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class RwkvHybridModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: RwkvHybridConfig = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        residual = ValueResidual()
        first_wkv = next(i for i in range(config.num_hidden_layers) if config.is_wkv_layer(i))

        def layer(prefix: str) -> nn.Module:
            i = extract_layer_index(prefix)
            if config.is_wkv_layer(i):
                return TimeMixingDecoderLayer(config, prefix, i == first_wkv, residual)
            return KEPT_LAYERS[config.teacher_model_type](config, vllm_config, prefix)

        self.start_layer, self.end_layer, self.layers = make_layers(config.num_hidden_layers, layer,
                                                                    prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: Tensor | None, positions: Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class RwkvHybridForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsMambaPrefixCaching):
    """vLLM's entry for ``architectures: ["RwkvHybridForCausalLM"]`` (registered by the plugin)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = RwkvHybridModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    # The state cache's layout, asked by vLLM before the model exists
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        parallel = vllm_config.parallel_config
        return state_shapes(vllm_config.model_config.hf_config, parallel.tensor_parallel_size)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return state_dtypes(vllm_config.model_config.dtype)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return get_temporal_copy_spec, get_temporal_copy_spec  # both states are copied whole

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: Tensor | None, positions: Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: Tensor | None = None, **kwargs) -> Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """The checkpoint's tensors into this rank's parameters: the teacher-family layers as vLLM
        loads them (q/k/v and gate/up stacked), the time mixers cut to this rank's heads. Every
        parameter must be given: a checkpoint that lacks one is refused (a partial
        load would serve wrong tokens silently)."""
        params = dict(self.named_parameters())
        tied = {"lm_head.weight"} if self.config.tie_word_embeddings else set()  # the embedding's
        loaded: set[str] = set()
        for name, tensor in weights:
            if name in tied:
                continue
            mixer = ".time_mixer." in name
            target, shard = name, None
            for stacked, piece, shard_id in () if mixer else STACKED:
                if piece in name:
                    target, shard = name.replace(piece, stacked), shard_id
                    break
            if target not in params:
                raise ServeError(f"arwkv vLLM model: the checkpoint's tensor {name} has no place in "
                                 f"this model (config.json and the weights disagree)")
            param = params[target]
            if mixer:
                param.data.copy_(head_shard(tensor, param.shape))
            elif shard is not None:
                param.weight_loader(param, tensor, shard)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        missing = sorted(set(params) - loaded - tied)
        if missing:
            raise ServeError(f"arwkv vLLM model: the checkpoint lacks {len(missing)} tensors: "
                             f"{some_names(missing)}")
        return loaded | tied


def head_shard(tensor: Tensor, shape: torch.Size) -> Tensor:
    """A time mixer's full tensor -> this rank's part, shape ``shape``: cut along the one dimension
    tensor parallelism divides (D = heads x head size, or H), which is the one that differs."""
    if tensor.shape == shape:
        return tensor
    dims = [d for d, (full, part) in enumerate(zip(tensor.shape, shape, strict=True)) if full != part]
    tp = get_tensor_model_parallel_world_size()
    if len(dims) != 1 or tensor.shape[dims[0]] != shape[dims[0]] * tp:
        raise ServeError(f"arwkv vLLM model: a time-mixer tensor of shape {tuple(tensor.shape)} does not "
                         f"fit the parameter {tuple(shape)} (tensor parallel size {tp})")
    d, size = dims[0], shape[dims[0]]
    return tensor.narrow(d, get_tensor_model_parallel_rank() * size, size)
