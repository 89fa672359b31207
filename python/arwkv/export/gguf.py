"""A student as a GGUF file for llama.cpp (``arwkv export --gguf``): RWKV-7 students as its
``arwkv7`` architecture, RWKV-6 students of the qrwkv form as its ``rwkv6qwen2``.

llama.cpp's loader wants exactly its own tensors, so what it has no place for is refused in one
line before anything is written. Both: hybrids (layers that keep attention), an attention width
other than the hidden size, MLP biases. arwkv7 also: receptance/key/value biases, a GroupNorm
whose epsilon is not the one llama.cpp hard-codes (64e-5, i.e. ``head_size_divisor`` 8).
rwkv6qwen2 also: the finch form (llama.cpp computes the qrwkv recurrence: see
``RwkvHybridConfig.wkv6_form``) and a GroupNorm (its qrwkv path has none).

arwkv7, per layer:
- the token-shift lerps x_r, x_w, x_k, x_v, x_a (, x_g) are stacked in that order into
  ``time_mix_lerp_fused`` [6 (5 without gate), 1, 1, C];
- the low-rank matrices (w1, a1, v1, g1: [C, R]; w2, a2, v2, g2: [R, C]) are stored transposed;
  the [1, 1, C] vectors squeezed; r_k [H, N] flattened head-major;
- layer 0's value-residual v0, v1, v2 are never used by the model; llama.cpp expects them with the
  ``a`` rank, so layer 0 stores copies of a0, a1, a2 there (as llama.cpp's own converter does).

rwkv6qwen2, per layer:
- ``time_mix_lerp_x`` = time_maa_x; ``time_mix_lerp_fused`` [5, 1, 1, C] stacks time_maa_w, _k, _v,
  _r, _g (llama.cpp's order, which is also the order of the 5-way mixer's slices);
- ``time_mix_w1`` [5 R, C] = time_maa_w1 transposed; ``time_mix_w2`` [5, C, R] = time_maa_w2 with
  each slice transposed; ``time_mix_decay`` = time_decay flattened; ``time_mix_decay_w1/w2``
  transposed; receptance/key/value (with their biases when the student has them), gate, output;
- no ``time_mix_first``: without it llama.cpp takes its qrwkv path (sigmoid gate, key scaled by
  1 - decay, gated linear attention scaled by 1/sqrt(N)), which is the qrwkv form's math;
- a student without gate gets a zero gate (sigmoid 0 = 1/2) and twice its output matrix: exact
  in f32, bf16 and q8_0, since scaling by 2 only moves the exponent (f16 too but for weights under
  2^-14, subnormal there, which round on their own grid: differences of 2^-25 at most).

Both: ``output.weight`` is always written (llama.cpp does not fall back to the embedding): for a
tied student, a copy of the embedding.

Types: norms and other vectors, the lerps and every low-rank time-mix matrix stay float32 under
each --outtype (they are small, and llama.cpp's own quantizer leaves them alone too); the large
matrices (embedding, output, receptance/key/value/gate/output, MLP) take the outtype. A q8_0
matrix whose rows are not a multiple of 32 falls back to f16 (reported).

The tokenizer is written as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary: tokens padded to the
embedding's rows, token types, merges, special ids and the chat template. llama.cpp chooses its
pre-tokenizer by name; this exporter writes ``qwen2`` when the tokenizer's pre-tokenizer is
Qwen2's (its split regex, then byte-level), and refuses other tokenizers rather than let llama.cpp
tokenize differently from transformers.

Head sizes: llama.cpp's CPU WKV-7 kernel runs heads in blocks of 64 floats on AVX-512 (32 on
AVX2), and its CUDA WKV-7 and gated-linear-attention kernels take head sizes 64 and 128 only:
other head sizes are written, with a warning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import partial_name
from ..loading import load_tokenizer, open_student_tensors
from ..models.configuration_rwkv_hybrid import RwkvHybridConfig
from ..runtime import ConfigError

ARCHES = {7: "arwkv7", 6: "rwkv6qwen2"}  # llama.cpp's architecture for each wkv_version
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Qwen2's pre-tokenizer split (transformers' tokenizer.json), which llama.cpp calls "qwen2"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LERPS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # llama.cpp's order in time_mix_lerp_fused
LOW_RANK = ("w", "a", "v", "g")  # decay, in-context learning rate, value residual, gate
RWKV6_LERPS = ("w", "k", "v", "r", "g")  # llama.cpp's order in rwkv6qwen2's time_mix_lerp_fused


class ExportError(ConfigError):
    """A student that cannot be written for llama.cpp; the message says why."""


@dataclass
class ExportReport:
    path: Path
    outtype: str
    tensors: int
    warnings: list[str] = field(default_factory=list)


def unsupported(config: RwkvHybridConfig, names: set[str]) -> str | None:
    """Why llama.cpp cannot run this student (as ``ARCHES[config.wkv_version]``), or None."""
    arch = ARCHES[config.wkv_version]
    if config.wkv_layers is not None and len(config.wkv_layers) != config.num_hidden_layers:
        return f"a hybrid student (layers that keep attention; llama.cpp's {arch} has none)"
    if config.attention_hidden_size != config.hidden_size:
        return (f"attention width {config.attention_hidden_size} != hidden size {config.hidden_size} "
                f"(llama.cpp's {arch} has them equal)")
    if any(".mlp." in n and n.endswith(".bias") for n in names):
        return f"MLP biases (llama.cpp's {arch} MLP has none)"
    if config.wkv_version == 6:
        if config.wkv6_form != "qrwkv":
            return (f"an RWKV-6 student of the {config.wkv6_form} form (a per-head bonus, each token reading "
                    "the state before its update, a silu gate): llama.cpp's rwkv6qwen2 computes the qrwkv "
                    "form; convert with --wkv6-form qrwkv")
        if config.wkv_has_group_norm:
            return ("GroupNorm of the WKV output (llama.cpp's rwkv6qwen2 has none; convert without "
                    "--group-norm)")
        return None
    if config.wkv_qkv_bias or any(n.endswith(("receptance.bias", "key.bias", "value.bias")) for n in names):
        return ("receptance/key/value biases (a --keep-bias conversion; llama.cpp's arwkv7 has no place for "
                "them: convert without --keep-bias)")
    if config.wkv_has_group_norm and config.head_size_divisor != 8:
        return (f"GroupNorm with head_size_divisor {config.head_size_divisor} (llama.cpp's arwkv7 hard-codes "
                "the epsilon of divisor 8)")
    return None


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for this tokenizer's pre-tokenizer ("qwen2"), or None when unknown."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if (len(parts) == 2 and parts[0].get("type") == "Split"
            and (parts[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        return "qwen2"
    return None


def _tensor_type(name: str, shape: tuple[int, ...], outtype: str):
    """The GGML type of output tensor ``name``: see the module docstring."""
    import gguf

    small = len(shape) <= 1 or name.endswith("_norm.weight") or any(
        f"time_mix_{x}." in name for x in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2", "lerp_fused",
                                            "lerp_x", "decay_w1", "decay_w2"))
    if small or outtype == "f32":
        return gguf.GGMLQuantizationType.F32
    return {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]


def llama_tensors(config: RwkvHybridConfig, get) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in numpy layout) for every tensor llama.cpp loads for this
    student (``ARCHES[config.wkv_version]``), from the student's tensors (``get(name)``)."""
    out = [("token_embd.weight", get("model.embed_tokens.weight")),
           ("output_norm.weight", get("model.norm.weight"))]
    for i in range(config.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        out.append((blk + "attn_norm.weight", get(hf + "input_layernorm.weight")))
        mixer = _arwkv7_mixer if config.wkv_version == 7 else _rwkv6qwen2_mixer
        out += mixer(config, lambda name, hf=hf: get(hf + "self_attn.time_mixer." + name), blk, i)
        out += [(blk + "ffn_norm.weight", get(hf + "post_attention_layernorm.weight")),
                (blk + "ffn_gate.weight", get(hf + "mlp.gate_proj.weight")),
                (blk + "ffn_up.weight", get(hf + "mlp.up_proj.weight")),
                (blk + "ffn_down.weight", get(hf + "mlp.down_proj.weight"))]
    out.append(("output.weight", get("lm_head.weight") if not config.tie_word_embeddings
                else get("model.embed_tokens.weight")))
    return [(name, t.float().contiguous()) for name, t in out]


def _rwkv6qwen2_mixer(config: RwkvHybridConfig, get, blk: str, i: int) -> list[tuple[str, torch.Tensor]]:
    """Layer i's time mixer as rwkv6qwen2's time_mix_* tensors (see the module docstring)."""
    out = [(blk + "time_mix_lerp_x.weight", get("time_maa_x")),
           (blk + "time_mix_lerp_fused.weight", torch.stack([get(f"time_maa_{x}") for x in RWKV6_LERPS], 0)),
           (blk + "time_mix_w1.weight", get("time_maa_w1").t()),
           (blk + "time_mix_w2.weight", get("time_maa_w2").transpose(1, 2)),
           (blk + "time_mix_decay.weight", get("time_decay").reshape(-1)),
           (blk + "time_mix_decay_w1.weight", get("time_decay_w1").t()),
           (blk + "time_mix_decay_w2.weight", get("time_decay_w2").t())]
    for proj in ("receptance", "key", "value"):
        out.append((blk + f"time_mix_{proj}.weight", get(f"{proj}.weight")))
        if config.wkv_qkv_bias:
            out.append((blk + f"time_mix_{proj}.bias", get(f"{proj}.bias")))
    if config.wkv_has_gate:
        out += [(blk + "time_mix_gate.weight", get("gate.weight")),
                (blk + "time_mix_output.weight", get("output.weight"))]
    else:  # sigmoid(0) = 1/2 undone by twice the output matrix (exact: see the module docstring)
        output = get("output.weight")
        out += [(blk + "time_mix_gate.weight", output.new_zeros(output.shape[1], output.shape[0])),
                (blk + "time_mix_output.weight", output.float() * 2)]
    return out


def _arwkv7_mixer(config: RwkvHybridConfig, get, blk: str, i: int) -> list[tuple[str, torch.Tensor]]:
    """Layer i's time mixer as arwkv7's time_mix_* tensors (see the module docstring)."""
    lerps = [get(x) for x in LERPS if x != "x_g" or config.wkv_has_gate]
    out = [(blk + "time_mix_lerp_fused.weight", torch.stack(lerps, 0))]
    for x in LOW_RANK:
        if x == "g":
            if config.wkv_has_gate:
                out += [(blk + "time_mix_g1.weight", get("g1").t()),
                        (blk + "time_mix_g2.weight", get("g2").t())]
            continue
        src = "a" if (x == "v" and i == 0) else x  # layer 0: v* unused, a* copies (see above)
        out += [(blk + f"time_mix_{x}0.weight", get(f"{src}0").reshape(-1)),
                (blk + f"time_mix_{x}1.weight", get(f"{src}1").t()),
                (blk + f"time_mix_{x}2.weight", get(f"{src}2").t())]
    out += [(blk + "time_mix_k_k.weight", get("k_k").reshape(-1)),
            (blk + "time_mix_k_a.weight", get("k_a").reshape(-1)),
            (blk + "time_mix_r_k.weight", get("r_k").reshape(-1))]
    for proj in ("receptance", "key", "value", "output"):
        out.append((blk + f"time_mix_{proj}.weight", get(f"{proj}.weight")))
    if config.wkv_has_group_norm:
        out += [(blk + "time_mix_ln.weight", get("ln_x.weight")),
                (blk + "time_mix_ln.bias", get("ln_x.bias"))]
    return out


def _vocabulary(model_dir: Path, n_rows: int) -> dict:
    """llama.cpp's gpt2 vocabulary of the student's tokenizer (tokens padded to ``n_rows``)."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json (a fast, byte-level BPE tokenizer is needed)")
    spec = json.loads(path.read_text())
    if (spec.get("model") or {}).get("type") != "BPE":
        raise ExportError(f"{path}: a {(spec.get('model') or {}).get('type')} tokenizer; llama.cpp's gpt2 "
                          "vocabulary is byte-level BPE")
    pre = pre_tokenizer_name(spec)
    if pre is None:
        raise ExportError(f"{path}: its pre-tokenizer is not Qwen2's, and no other is mapped to a llama.cpp "
                          "pre-tokenizer yet (llama.cpp would tokenize differently from transformers)")
    tok = load_tokenizer(model_dir)
    vocab = tok.get_vocab()
    if len(vocab) > n_rows:
        raise ExportError(f"the tokenizer has {len(vocab)} tokens but the embedding only {n_rows} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = spec["model"].get("merges", [])
    # merges as "a b"; a space inside a part (the newer list form allows it) as U+0120, as gguf does
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m) for m in merges]
    special = {kind: getattr(tok, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")}
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges, "special": special,
            "chat_template": template}


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16",
                overwrite: bool = False) -> ExportReport:
    """Writes the student in ``model_dir`` to ``out`` as a GGUF of llama.cpp's arwkv7 (RWKV-7) or
    rwkv6qwen2 (RWKV-6, qrwkv form) architecture (see the module docstring); the file appears only
    when complete."""
    import gguf

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    if out.is_dir():  # --overwrite replaces a file, never a directory
        raise ExportError(f"--gguf {out} is a directory; give the file to write, e.g. {out / 'student.gguf'}")
    if out.exists() and not overwrite:
        raise ExportError(f"--gguf {out} exists (--overwrite replaces it)")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"--gguf {out}: {out.parent} is not a directory")
    ckpt = open_student_tensors(model_dir, "--model")
    config: RwkvHybridConfig = ckpt.config
    arch = ARCHES[config.wkv_version]
    problem = unsupported(config, set(ckpt.names))
    if problem:
        raise ExportError(f"llama.cpp's {arch} cannot run {problem}")
    warnings = []
    if config.wkv_version == 7 and config.head_size % 64:
        warnings.append(f"head size {config.head_size}: llama.cpp's CPU WKV-7 kernel runs heads in blocks "
                        "of 64 floats on AVX-512 (32 on AVX2), and its CUDA kernel takes 64 and 128 only; "
                        "expect wrong outputs there (convert with --head-size 64)")
    if config.wkv_version == 6 and config.head_size not in (64, 128):
        warnings.append(f"head size {config.head_size}: llama.cpp's CUDA gated-linear-attention kernel takes "
                        "64 and 128 only (its CPU kernel runs any); convert with --head-size 64 for GPUs")
    tensors = llama_tensors(config, ckpt.get)
    vocab = _vocabulary(model_dir, tensors[0][1].shape[0])

    out.parent.mkdir(parents=True, exist_ok=True)  # a missing folder is made (as --out folders are)
    tmp = partial_name(out)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type("model")
        writer.add_name(model_dir.name)
        writer.add_context_length(1048576)  # a recurrent model: no positional limit
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_wkv_head_size(config.head_size)
        if config.wkv_version == 7:
            writer.add_decay_lora_rank(config.decay_low_rank)
            writer.add_iclr_lora_rank(config.a_low_rank)
            writer.add_value_residual_mix_lora_rank(config.v_low_rank)
            writer.add_gate_lora_rank(config.gate_low_rank if config.wkv_has_gate else 0)
        else:
            writer.add_time_mix_extra_dim(config.lora_rank_tokenshift)
            writer.add_time_decay_extra_dim(config.lora_rank_decay)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_token_shift_count(1)  # llama.cpp's graph asserts one shifted vector per layer
        # read by llama.cpp's generic loader; 0 heads make rwkv6qwen2 take key/value at full width
        writer.add_head_count(0)
        file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                      "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
        writer.add_file_type(file_types[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        for kind, token_id in vocab["special"].items():
            if token_id is not None:
                getattr(writer, {"pad": "add_pad_token_id"}.get(kind, f"add_{kind}_token_id"))(token_id)
        writer.add_add_bos_token(False)  # Qwen2's tokenizers add no BOS
        if vocab["chat_template"]:
            writer.add_chat_template(vocab["chat_template"])
        for name, t in tensors:
            qtype = _tensor_type(name, tuple(t.shape), outtype)
            data = t.numpy()
            try:
                packed = gguf.quants.quantize(data, qtype)
            except gguf.quants.QuantError:  # rows not a multiple of the q8_0 block
                qtype = gguf.GGMLQuantizationType.F16
                packed = gguf.quants.quantize(data, qtype)
                warnings.append(f"{name} {tuple(t.shape)}: rows not a multiple of 32, written as f16")
            writer.add_tensor(name, packed, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportReport(out, outtype, len(tensors), warnings)


def read_back(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors as float32 numpy arrays in numpy layout) of a GGUF file, with gguf's reader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, fld in reader.fields.items():
        if not fld.types:
            continue
        value = fld.contents()
        meta[key] = value
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists dimensions innermost first
        tensors[t.name] = np.asarray(data, dtype=np.float32).reshape(shape)
    return meta, tensors
