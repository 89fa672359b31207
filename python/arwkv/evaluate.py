"""``arwkv eval``: perplexity and scoring speed of a causal LM checkpoint (a student, or its
Transformer teacher, scored the same way) on a text dataset.

Each document is cut into windows of at most seq_len tokens, every window starting from an empty
context (the same for a Transformer and an RNN); the perplexity is exp of the mean next-token
negative log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DataError, iter_records, split_documents, tokenize_documents


def windows(docs: list[list[int]], seq_len: int) -> list[list[int]]:
    """Documents cut into pieces of at most seq_len tokens (one-token pieces predict nothing: dropped)."""
    return [
        d[i : i + seq_len] for d in docs for i in range(0, len(d), seq_len) if len(d[i : i + seq_len]) > 1
    ]


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    validation_fraction: float = 0.0,
    seed: int = 0,
    max_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "fp32",
) -> dict:
    """Scores ``model_dir`` on ``data`` (or on its validation split, as ``arwkv distill`` splits it
    with the same fraction and seed). Returns {"perplexity", "nll", "tokens", "seconds",
    "tokens_per_s", ...}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model {model_dir} is not a checkpoint directory")
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    dev = torch.device(
        "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = (
        AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch_dtype)
        .to(dev)
        .eval()
    )
    docs = tokenize_documents(iter_records(data), tokenizer)
    if validation_fraction:
        docs = split_documents(docs, validation_fraction, seed)[1]
    pieces = windows(docs, seq_len)
    if max_tokens:
        kept, total = [], 0
        for p in pieces:
            if total >= max_tokens:
                break
            kept.append(p)
            total += len(p)
        pieces = kept
    if not pieces:
        raise DataError(f"{data} gives no text to score")
    by_length: dict[int, list[list[int]]] = {}
    for p in pieces:
        by_length.setdefault(len(p), []).append(p)
    nll, count = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for length in sorted(by_length):
            group = by_length[length]
            for i in range(0, len(group), batch_size):
                ids = torch.tensor(group[i : i + batch_size], device=dev)
                logits = model(ids, use_cache=False).logits
                nll += F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
                ).item()
                count += ids[:, 1:].numel()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    scored = sum(len(p) for p in pieces)
    return {
        "model": str(model_dir),
        "data": str(data),
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": scored,
        "predicted_tokens": count,
        "seconds": seconds,
        "tokens_per_s": scored / seconds,
        "seq_len": seq_len,
        "device": dev.type,
        "dtype": dtype,
    }
