"""Configuration of the ARWKV student (``model_type = "rwkv_hybrid"``).

The keys follow the published ``rwkv_hybrid`` checkpoints: the teacher's own config keys
(hidden_size, intermediate_size, num_hidden_layers, rms_norm_eps, vocab_size, ...) plus
``head_size``, ``head_size_divisor``, ``wkv_version``, ``wkv_has_gate``, ``wkv_has_group_norm``
and the optional ``wkv_layers``. arwkv's own additions are optional keys with defaults that
reproduce the published layout.
"""

from __future__ import annotations

from transformers import PretrainedConfig

WKV6_FORMS = ("finch", "qrwkv")  # RWKV-6 recurrences: see RwkvHybridConfig's wkv6_form


def _kernel_head_sizes() -> tuple[int, ...] | None:
    """The head sizes the compiled WKV kernels run: ``arwkv_ext.HEAD_SIZES``, the one definition.
    Imported here, lazily and absolutely, because this file is also copied into checkpoints and
    loaded on its own (trust_remote_code). None without arwkv_ext: the config can still be read
    (the model itself cannot run without the kernels, and says so when it is built)."""
    try:
        import arwkv_ext
    except ImportError:
        return None
    return tuple(arwkv_ext.HEAD_SIZES)


class RwkvHybridConfig(PretrainedConfig):
    """Teacher decoder + RWKV time mixing in place of self-attention.

    Args (beyond the teacher's keys, which are kept as they are):
        head_size: WKV head size N: one of the sizes the WKV kernels run (``arwkv_ext.HEAD_SIZES``;
            64 in the published models).
        head_size_divisor: scales the group-norm epsilon (``1e-5 * divisor**2``).
        wkv_version: 7 (RWKV-7 time mixing) or 6 (RWKV-6, stock parameter names).
        wkv6_form: which RWKV-6 recurrence (RWKV-6 only). "finch": stock Finch, each token reads
            the state before its own update plus a per-head bonus ``time_faaaa``, gate
            ``silu(x Wg)``. "qrwkv": the QRWKV6 form (the RADLADS conversions; llama.cpp's
            rwkv6qwen2 architecture): no bonus, the key scaled by (1 - decay), each token reads
            the state after its update scaled by 1/sqrt(head_size), gate ``sigmoid(x Wg)``.
            Default "finch" (files written before the key existed); ``arwkv convert`` writes
            "qrwkv" unless told otherwise.
        wkv_has_gate: output gate (RWKV-7: ``sigmoid(x G1) G2``; RWKV-6: ``silu(x Wg)``, or
            ``sigmoid(x Wg)`` in the "qrwkv" form).
        wkv_has_group_norm: per-head GroupNorm of the WKV output.
        wkv_layers: indices of the layers that use time mixing (None: all); the others keep the
            teacher's attention (a hybrid).
        teacher_model_type: the teacher's ``model_type``; its MLP and RMSNorm classes are reused.
        attention_hidden_size: width of r, k, v (the teacher's heads x head_dim; default
            hidden_size, as in the published models).
        wkv_qkv_bias: receptance / key / value carry biases (copied from a teacher that has them).
        decay_low_rank, a_low_rank, v_low_rank, gate_low_rank: the low-rank widths (64/64/32/128).
        lora_rank_tokenshift, lora_rank_decay: RWKV-6's low-rank widths (its token-shift mixer
            and its decay), under the published keys; None: the published rule, 32 and 64, both
            doubled from hidden_size 4096 on. Stored resolved, so a saved config states them.
    """

    model_type = "rwkv_hybrid"

    def __init__(self, vocab_size: int = 151936, hidden_size: int = 896, intermediate_size: int = 4864,
                 num_hidden_layers: int = 24, hidden_act: str = "silu", rms_norm_eps: float = 1e-6,
                 tie_word_embeddings: bool = False, head_size: int = 64, head_size_divisor: int = 8,
                 wkv_version: int = 7, wkv6_form: str = "finch", wkv_has_gate: bool = True,
                 wkv_has_group_norm: bool = False,
                 wkv_layers: list[int] | None = None, teacher_model_type: str = "qwen2",
                 attention_hidden_size: int | None = None, wkv_qkv_bias: bool = False,
                 decay_low_rank: int = 64, a_low_rank: int = 64, v_low_rank: int = 32,
                 gate_low_rank: int = 128, lora_rank_tokenshift: int | None = None,
                 lora_rank_decay: int | None = None, **kwargs) -> None:
        # The published configuration class also writes num_wkv_heads, which here follows from
        # attention_hidden_size / head_size: accepted when it agrees, refused when it does not.
        published_heads = kwargs.pop("num_wkv_heads", None)
        # The teacher's per-layer attention kinds (all full_attention when it has none): kept
        # layers keep theirs, time-mixing layers say "linear_attention" (set by _validate).
        teacher_layer_types = kwargs.pop("layer_types", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.head_size = head_size
        self.head_size_divisor = head_size_divisor
        self.wkv_version = wkv_version
        self.wkv6_form = wkv6_form
        self.wkv_has_gate = wkv_has_gate
        self.wkv_has_group_norm = wkv_has_group_norm
        self.wkv_layers = wkv_layers
        self.teacher_model_type = teacher_model_type
        self.attention_hidden_size = attention_hidden_size or hidden_size
        self.wkv_qkv_bias = wkv_qkv_bias
        self.decay_low_rank = decay_low_rank
        self.a_low_rank = a_low_rank
        self.v_low_rank = v_low_rank
        self.gate_low_rank = gate_low_rank
        wide = hidden_size >= 4096  # the published RWKV-6 layouts double both widths there
        if lora_rank_tokenshift is None:
            lora_rank_tokenshift = 64 if wide else 32
        if lora_rank_decay is None:
            lora_rank_decay = 128 if wide else 64
        self.lora_rank_tokenshift = lora_rank_tokenshift
        self.lora_rank_decay = lora_rank_decay
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.layer_types = teacher_layer_types
        self._validate()
        if published_heads is not None and published_heads != self.num_wkv_heads:
            raise ValueError(f"rwkv_hybrid: num_wkv_heads {published_heads} does not match "
                             f"attention_hidden_size {self.attention_hidden_size} / head_size "
                             f"{self.head_size} = {self.num_wkv_heads}")

    def _validate(self) -> None:
        """Raises a one-line ValueError for a config the student cannot run."""
        if self.wkv_version not in (6, 7):
            raise ValueError(f"rwkv_hybrid: wkv_version {self.wkv_version} is not 7 (RWKV-7) or 6 (RWKV-6)")
        if self.wkv6_form not in WKV6_FORMS:
            raise ValueError(f"rwkv_hybrid: wkv6_form {self.wkv6_form!r} is not one of "
                             f"{', '.join(WKV6_FORMS)}")
        head_sizes = _kernel_head_sizes()
        if head_sizes is not None and self.head_size not in head_sizes:
            raise ValueError(f"rwkv_hybrid: head_size {self.head_size} is not one of "
                             f"{', '.join(map(str, head_sizes))} (the head sizes the WKV kernels run)")
        for key in ("decay_low_rank", "a_low_rank", "v_low_rank", "gate_low_rank", "lora_rank_tokenshift",
                    "lora_rank_decay"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"rwkv_hybrid: {key} {value!r} is not a positive integer")
        if self.attention_hidden_size % self.head_size:
            raise ValueError(f"rwkv_hybrid: attention_hidden_size {self.attention_hidden_size} is not a "
                             f"multiple of head_size {self.head_size}")
        if self.wkv_layers is not None:
            bad = [i for i in self.wkv_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(f"rwkv_hybrid: wkv_layers {bad} are not layers of a "
                                 f"{self.num_hidden_layers}-layer model")
            self.wkv_layers = sorted(set(self.wkv_layers))
        self._set_layer_types()

    def set_wkv_layers(self, wkv_layers: list[int] | None) -> None:
        """Changes which layers use time mixing (checked, and ``layer_types`` follows)."""
        self.wkv_layers = wkv_layers
        self._validate()

    def _set_layer_types(self) -> None:
        """``layer_types`` (transformers' and vLLM's per-layer kind): "linear_attention" for the
        time-mixing layers, the teacher's kind (default "full_attention") for kept attention, so
        a checkpoint says itself which layers hold a recurrent state."""
        given = list(getattr(self, "layer_types", None) or [])
        kinds = []
        for i in range(self.num_hidden_layers):
            kept = given[i] if i < len(given) and given[i] != "linear_attention" else "full_attention"
            kinds.append("linear_attention" if self.is_wkv_layer(i) else kept)
        self.layer_types = kinds

    def is_wkv_layer(self, layer_idx: int) -> bool:
        """Whether layer layer_idx uses time mixing (else it keeps the teacher's attention)."""
        return self.wkv_layers is None or layer_idx in self.wkv_layers

    @property
    def num_wkv_heads(self) -> int:
        """Heads of the time mixers: attention_hidden_size / head_size."""
        return self.attention_hidden_size // self.head_size


# save_pretrained then writes auto_map and copies this file beside the weights (trust_remote_code).
RwkvHybridConfig.register_for_auto_class()
