"""Teacher -> student conversion: one mapping of tensors (``student_tensors``), used both for a
teacher already in memory (``student_from_teacher``) and for streaming a checkpoint directory
from disk to disk (``convert_checkpoint``, the ``arwkv convert`` command).

Everything but the attentions is copied bit-exactly (tied embeddings become two tensors).
``init="transfer"`` (default): receptance, key, value, output <- q_proj, k_proj, v_proj, o_proj,
grouped key/value heads expanded as the teacher uses them (transformers' repeat_kv: each kv
head serves a contiguous group of query heads). The teacher's q/k/v biases are dropped unless
``keep_bias=True``: the published ARWKV layout, its inference code and llama.cpp have no
receptance/key/value biases (the published code silently ignores them), so only arwkv runs a
student that keeps them.
``init="fresh"``: ARWKV's initialisation (nn.Linear's default for the four projections).
The time mixers' own parameters always start from ARWKV's initial values.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..files import atomic_directory
from ..loading import SafetensorsCheckpoint, check_teacher_dir
from ..models.configuration_rwkv_hybrid import RwkvHybridConfig
from ..models.modeling_rwkv_hybrid import RwkvHybridForCausalLM, teacher_classes, time_mixer_class
from ..runtime import ConfigError, dtype_from_name, mix_seed, torch_dtype_name

Tensor = torch.Tensor
# Files of a teacher checkpoint that travel unchanged (tokenizer and generation settings).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                "chat_template.jinja", "chat_template.json")


class ConversionError(ConfigError):
    """A teacher that cannot be converted; the message names what is wrong."""


def expand_kv_heads(weight: Tensor, num_kv_heads: int, num_heads: int) -> Tensor:
    """[num_kv_heads * d, ...] -> [num_heads * d, ...], each kv head repeated for the contiguous
    group of query heads it serves (the order of transformers' repeat_kv)."""
    if num_kv_heads == num_heads:
        return weight
    group = num_heads // num_kv_heads
    d = weight.shape[0] // num_kv_heads
    return weight.reshape(num_kv_heads, d, *weight.shape[1:]).repeat_interleave(group, dim=0).reshape(
        num_heads * d, *weight.shape[1:])


def student_config(teacher_config: PretrainedConfig, *, head_size: int = 64, gate: bool = True,
                   group_norm: bool = False, qkv_bias: bool = False, wkv: int = 7,
                   wkv6_form: str = "qrwkv", wkv_layers: list[int] | None = None) -> RwkvHybridConfig:
    """The student's config: the teacher's keys, plus the time mixer's."""
    t = teacher_config.to_dict()
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "_name_or_path"):
        t.pop(key, None)
    heads = teacher_config.num_attention_heads
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // heads
    t.update(
        head_size=head_size, head_size_divisor=8, wkv_version=wkv, wkv6_form=wkv6_form, wkv_has_gate=gate,
        wkv_has_group_norm=group_norm, wkv_layers=wkv_layers, teacher_model_type=teacher_config.model_type,
        attention_hidden_size=heads * head_dim, wkv_qkv_bias=qkv_bias, tie_word_embeddings=False,
        architectures=["RwkvHybridForCausalLM"],
    )
    return RwkvHybridConfig(**t)


def student_tensors(config: RwkvHybridConfig, get: Callable[[str], Tensor], *, init: str = "transfer",
                    num_kv_heads: int | None = None, num_heads: int | None = None,
                    seed: int = 0) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the student, in checkpoint order, from ``get(teacher_name)``.

    Time mixers are built one layer at a time, seeded with ``mix_seed(seed, layer)``, so memory
    stays at one layer's worth beyond the tensor being yielded and each layer's random initial
    values depend only on the seed and its index.
    """
    if init not in ("transfer", "fresh"):
        raise ValueError(f"init must be 'transfer' or 'fresh', got {init!r}")
    heads = num_heads or config.num_attention_heads
    kv_heads = num_kv_heads or getattr(config, "num_key_value_heads", None) or heads
    yield "model.embed_tokens.weight", get("model.embed_tokens.weight")
    for i in range(config.num_hidden_layers):
        t, s = f"model.layers.{i}.", f"model.layers.{i}.self_attn.time_mixer."
        if not config.is_wkv_layer(i):  # a hybrid keeps this attention layer as it is
            attention_cls = teacher_classes(config.teacher_model_type, kept_attention=True)["Attention"]
            with torch.device("meta"):
                attention = attention_cls(config, i)
            for name in attention.state_dict():
                yield f"{t}self_attn.{name}", get(f"{t}self_attn.{name}")
            yield from _layer_rest(config, get, t)
            continue
        torch.manual_seed(mix_seed(seed, i))
        mixer = time_mixer_class(config)(config, i)
        mixed = {}
        if init == "transfer":
            for mine, theirs, grouped in (("receptance", "q_proj", False), ("key", "k_proj", True),
                                          ("value", "v_proj", True), ("output", "o_proj", False)):
                names = ["weight"] + (["bias"] if getattr(mixer, mine).bias is not None else [])
                for n in names:
                    x = get(f"{t}self_attn.{theirs}.{n}")
                    mixed[f"{mine}.{n}"] = expand_kv_heads(x, kv_heads, heads) if grouped else x
        for name, value in mixer.state_dict().items():
            yield s + name, mixed.get(name, value)
        yield from _layer_rest(config, get, t)
    yield "model.norm.weight", get("model.norm.weight")
    yield "lm_head.weight", get("lm_head.weight")


def _layer_rest(config: RwkvHybridConfig, get: Callable[[str], Tensor],
                t: str) -> Iterator[tuple[str, Tensor]]:
    """A layer's norms and MLP, copied."""
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        yield t + name, get(t + name)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        yield f"{t}mlp.{proj}.weight", get(f"{t}mlp.{proj}.weight")
        if getattr(config, "mlp_bias", False):
            yield f"{t}mlp.{proj}.bias", get(f"{t}mlp.{proj}.bias")


def _with_tied_head(get: Callable[[str], Tensor], tied: bool) -> Callable[[str], Tensor]:
    """A teacher with tied embeddings has no lm_head tensor: the student gets its own copy."""
    def getter(name: str) -> Tensor:
        if name == "lm_head.weight" and tied:
            return get("model.embed_tokens.weight").clone()
        return get(name)
    return getter


@torch.no_grad()
def student_from_teacher(teacher: PreTrainedModel, *, init: str = "transfer", head_size: int = 64,
                         gate: bool = True, group_norm: bool = False, keep_bias: bool = False,
                         seed: int = 0, wkv: int = 7, wkv6_form: str = "qrwkv",
                         wkv_layers: list[int] | None = None) -> RwkvHybridForCausalLM:
    """The student of a teacher already in memory (a transformers decoder with the standard
    layout: model.embed_tokens, model.layers[i].{self_attn, mlp, input_layernorm,
    post_attention_layernorm}, model.norm, lm_head)."""
    tcfg = teacher.config
    has_bias = getattr(teacher.model.layers[0].self_attn.q_proj, "bias", None) is not None
    config = student_config(tcfg, head_size=head_size, gate=gate, group_norm=group_norm,
                            qkv_bias=has_bias and keep_bias and init == "transfer", wkv=wkv,
                            wkv6_form=wkv6_form,
                            wkv_layers=wkv_layers)
    weights = teacher.state_dict()
    get = _with_tied_head(weights.__getitem__, "lm_head.weight" not in weights or
                          bool(getattr(tcfg, "tie_word_embeddings", False)))
    student = RwkvHybridForCausalLM(config).to(teacher.dtype)
    state = dict(student_tensors(config, get, init=init, seed=seed,
                                 num_kv_heads=getattr(tcfg, "num_key_value_heads", None),
                                 num_heads=tcfg.num_attention_heads))
    student.load_state_dict(state, strict=True)
    return student


def _parse_size(text: str) -> int:
    """``"500MB"`` -> 500_000_000 (KB, MB, GB are powers of 10; a bare number is bytes)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def convert_checkpoint(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                       init: str = "transfer", head_size: int = 64, gate: bool = True,
                       group_norm: bool = False, keep_bias: bool = False, dtype: str = "auto",
                       overwrite: bool = False, max_shard_size: str = "2GB", seed: int = 0,
                       wkv: int = 7, wkv6_form: str = "qrwkv", wkv_layers: list[int] | None = None) -> Path:
    """Streams a teacher checkpoint into a student checkpoint directory: sharded safetensors +
    index, config.json (with auto_map), the teacher's generation/tokenizer files, and the
    configuration/modeling .py files. ``dtype`` "auto" keeps the teacher's own (the dtype of its
    stored embedding), so every copied weight is copied bit for bit. Written to a temporary
    directory beside ``out_dir`` and renamed into place (files.atomic_directory; modes follow the
    umask), so a failure never leaves a directory that looks complete, and an existing
    ``out_dir`` (with ``overwrite``) is replaced only once the new one is complete."""
    from safetensors.torch import save_file

    if wkv not in (6, 7):
        raise ConversionError(f"--wkv {wkv}: expected 7 (RWKV-7) or 6 (RWKV-6)")
    try:
        torch_dtype = None if dtype == "auto" else dtype_from_name(dtype)
    except ValueError as err:
        raise ConversionError(f"{err} or auto") from err
    check_teacher_dir(teacher_dir, "--teacher")
    teacher = SafetensorsCheckpoint(teacher_dir, "--teacher")
    if torch_dtype is None:  # the teacher's own dtype: no weight is rounded on the way
        torch_dtype = teacher.dtype("model.embed_tokens.weight")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    tcfg = teacher.config
    try:
        teacher_classes(tcfg.model_type)
    except ValueError as err:
        raise ConversionError(str(err)) from err
    has_bias = "model.layers.0.self_attn.q_proj.bias" in teacher.names
    config = student_config(tcfg, head_size=head_size, gate=gate, group_norm=group_norm,
                            qkv_bias=has_bias and keep_bias and init == "transfer", wkv=wkv,
                            wkv6_form=wkv6_form,
                            wkv_layers=wkv_layers)
    config.dtype = torch_dtype_name(torch_dtype)
    config.auto_map = {"AutoConfig": "configuration_rwkv_hybrid.RwkvHybridConfig",
                       "AutoModelForCausalLM": "modeling_rwkv_hybrid.RwkvHybridForCausalLM"}
    tied = "lm_head.weight" not in teacher.names
    get = _with_tied_head(teacher.get, tied)

    with atomic_directory(out) as tmp:
        limit, shard, shard_bytes, shards, weight_map, total = _parse_size(max_shard_size), {}, 0, [], {}, 0

        def flush() -> None:
            nonlocal shard, shard_bytes
            if shard:
                name = f"shard-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                shards.append((name, list(shard)))
                shard, shard_bytes = {}, 0

        tensors = student_tensors(config, get, init=init, seed=seed,
                                  num_kv_heads=getattr(tcfg, "num_key_value_heads", None),
                                  num_heads=tcfg.num_attention_heads)
        for name, tensor in tensors:
            tensor = tensor.to(torch_dtype).contiguous()
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > limit:
                flush()
            shard[name] = tensor
            shard_bytes += size
            total += size
        flush()
        for k, (name, keys) in enumerate(shards):
            final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            (tmp / name).rename(tmp / final)
            weight_map.update(dict.fromkeys(keys, final))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        config.save_pretrained(tmp)
        # copyfile, not copy2: the copies get the umask's mode, like every other file written here
        package = Path(__file__).parent.parent / "models"
        for source in ("configuration_rwkv_hybrid.py", "modeling_rwkv_hybrid.py"):
            shutil.copyfile(package / source, tmp / source)
        for name in COPIED_FILES:
            if (Path(teacher_dir) / name).is_file():
                shutil.copyfile(Path(teacher_dir) / name, tmp / name)
    return out
