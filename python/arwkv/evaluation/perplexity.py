"""``arwkv eval``: perplexity and scoring speed of a causal LM checkpoint (a student, or its
Transformer teacher, scored the same way) on a text dataset.

Each document is cut into windows of at most seq_len tokens, every window starting from an empty
context (the same for a Transformer and an RNN); the perplexity is exp of the mean next-token
negative log-likelihood over all predicted tokens.

Also here: ``decoding_speed``, the decoding measurement that ``arwkv demo`` and
benchmarks/bench_decode.py share.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.records import DataError
from ..data.tokenize import scored_documents
from ..loading import check_checkpoint_dir, load_causal_lm
from ..runtime import dtype_from_name, resolve_device, torch_dtype_name


def windows(docs: Iterable[Sequence[int]], seq_len: int, max_tokens: int | None = None) -> list[list[int]]:
    """Documents cut into pieces of at most seq_len tokens (one-token pieces predict nothing:
    dropped); with max_tokens, pieces until they hold at least that many tokens (the documents
    after that are not read)."""
    pieces, total = [], 0
    for doc in docs:
        doc = doc.tolist() if hasattr(doc, "tolist") else list(doc)
        for i in range(0, len(doc), seq_len):
            if max_tokens and total >= max_tokens:
                return pieces
            if len(doc[i : i + seq_len]) > 1:
                pieces.append(doc[i : i + seq_len])
                total += len(pieces[-1])
    return pieces


@torch.no_grad()
def score_windows(model, pieces: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of a causal LM over windows of token ids (each
    from an empty context), and how many tokens it predicted. Windows of equal length are
    batched together."""
    device = next(model.parameters()).device
    by_length: dict[int, list[list[int]]] = {}
    for p in pieces:
        by_length.setdefault(len(p), []).append(p)
    nll, count = 0.0, 0
    for length in sorted(by_length):
        group = by_length[length]
        for i in range(0, len(group), batch_size):
            ids = torch.tensor(group[i : i + batch_size], device=device)
            logits = model(ids, use_cache=False).logits
            nll += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
            ).item()
            count += ids[:, 1:].numel()
    return nll, count


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
    log: Callable[[str], None] | None = None,
) -> dict:
    """Scores ``model_dir`` on ``data`` (or on its validation split, as ``arwkv distill`` splits it
    with the same fraction and seed). Returns {"perplexity", "nll", "tokens", "seconds",
    "tokens_per_s", ..., "cache_bytes"} (cache_bytes: ``cache_growth`` on the scored text's first
    tokens, measured after the timed scoring)."""
    check_checkpoint_dir(model_dir, "--model")
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    dev = resolve_device(device)
    model, tokenizer = load_causal_lm(model_dir, dev, dtype_from_name(dtype))
    pieces = windows(scored_documents(data, tokenizer, validation_fraction, seed), seq_len, max_tokens)
    if not pieces:
        raise DataError(f"{data} gives no text to score")
    if log:  # scoring can take a while: say what is being scored
        log(f"scoring {sum(len(p) for p in pieces)} tokens of {data} in {len(pieces)} windows of at most "
            f"{seq_len} on {dev.type}")
    start = time.perf_counter()
    nll, count = score_windows(model, pieces, batch_size)
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
        "cache_bytes": cache_growth(model, [t for p in pieces[:48] for t in p][:48]),
    }


def cache_bytes(cache) -> int:
    """Bytes held by a student cache (per-layer states, and a hybrid's kept keys and values) or a
    transformers KV cache (per-layer keys and values)."""
    tensors = []
    for layer in cache.layers or []:
        tensors += [getattr(layer, name, None) for name in ("wkv", "shift", "keys", "values")]
    if isinstance(getattr(cache, "keys", None), dict):  # RwkvHybridCache's kept attention layers
        tensors += list(cache.keys.values()) + list(cache.values.values())
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@torch.no_grad()
def cache_growth(model, token_ids: list[int], lengths: tuple[int, int] = (16, 48)) -> dict:
    """The cache memory of a causal LM (a student or a transformers model) as a function of the
    context: prefills prompts of lengths[0] and lengths[1] tokens (token_ids [n], repeated when
    shorter; their content does not matter) with ``use_cache``, counts each cache's bytes
    (cache_bytes) and fits bytes = constant + per_token * tokens through the two points.

    Returns {"constant": bytes that do not grow with the context (a student's recurrent states),
    "per_token": bytes each token of context adds (2 x kept attention layers x KV heads x head dim
    x the element size for a Transformer or a hybrid's kept layers; 0 for a pure student),
    "lengths": the two prompt lengths}."""
    short, long = lengths
    if not 0 < short < long:
        raise ValueError(f"cache_growth: lengths {lengths} must be 0 < short < long")
    if not token_ids:
        raise ValueError("cache_growth: no token ids to make the prompts of")
    device = next(model.parameters()).device
    measured = []
    for n in (short, long):
        ids = torch.tensor([(list(token_ids) * (n // len(token_ids) + 1))[:n]], device=device)
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        measured.append(cache_bytes(cache if cache is not None else out.past_key_values))
    per_token = (measured[1] - measured[0]) / (long - short)
    constant = measured[0] - per_token * short
    return {"constant": _integral(constant), "per_token": _integral(per_token), "lengths": [short, long]}


def _integral(x: float) -> int | float:
    """x as an int when it is a whole number (bytes usually are)."""
    return int(x) if float(x).is_integer() else x


def decoding_method(steps: int, repeats: int, warmup: int) -> dict:
    """What ``decoding_speed`` measures with these settings, for reports next to its numbers."""
    return {
        "batch": 1,
        "decoding": "greedy, one token per forward, with the cache",
        "steps": steps,
        "repeats": repeats,
        "warmup_runs": warmup,
        "statistic": "median over the repeats of (time of the run / steps)",
        "threads": torch.get_num_threads(),
    }


@torch.no_grad()
def decoding_speed(
    model, prompt: torch.Tensor, steps: int, repeats: int = 5, warmup: int = 1
) -> tuple[float, int]:
    """Seconds per greedy decoding step at batch 1 after the prompt [1, P], and the bytes of the
    cache after ``steps`` steps. Works for a student (``cache``) and a transformers model
    (``past_key_values``).

    The prompt is prefilled once, untimed (with ``logits_to_keep=1``, as generate() does). Then
    ``warmup`` untimed runs and ``repeats`` timed runs each decode ``steps`` tokens from their
    own copy of that cache, so every run measures the same positions P ... P + steps - 1 (one
    run decoding many steps would measure a KV cache that keeps growing). The result is the
    median over the timed runs of (run time / steps), so that a run disturbed by another
    process moves it little."""
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"decoding_speed: steps {steps} and repeats {repeats} must be at least 1, "
                         f"warmup {warmup} not negative")
    out = model(prompt, use_cache=True, logits_to_keep=1)
    student = hasattr(out, "cache")
    prefilled = out.cache if student else out.past_key_values
    first = out.logits[:, -1:].argmax(-1)
    cuda = prompt.device.type == "cuda"
    per_step, cache = [], prefilled
    for run in range(warmup + repeats):
        cache, token = copy.deepcopy(prefilled), first
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            if student:
                out = model(token, cache=cache)
            else:
                out = model(token, past_key_values=cache, use_cache=True)
            cache = out.cache if student else out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        if run >= warmup:
            per_step.append((time.perf_counter() - start) / steps)
    return statistics.median(per_step), cache_bytes(cache)


def lm_eval_task(
    model_dir: str | Path,
    task_file: str | Path,
    *,
    limit: int | None = None,
    device: str = "auto",
    batch_size: int = 1,
    dtype: str = "fp32",
) -> dict:
    """Scores ``model_dir`` with lm-evaluation-harness (its Hugging Face backend, trust_remote_code)
    on the task that a local YAML task file defines; relative ``dataset_kwargs.data_files`` paths
    in it are taken relative to the file. Returns lm_eval's results for that task."""
    import tempfile

    import yaml

    check_checkpoint_dir(model_dir, "--model")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            f"--lm-eval-task needs lm-evaluation-harness: pip install lm_eval accelerate ({err})"
        ) from err
    path = Path(task_file)
    if not path.is_file():
        raise FileNotFoundError(f"--lm-eval-task {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:  # includes !function tags, which a copied task file cannot carry
        raise ValueError(
            f"--lm-eval-task {path}: not readable YAML (a self-contained task file is "
            f"needed: no !function or include): {str(err).splitlines()[0]}"
        ) from err
    if not isinstance(spec, dict) or "task" not in spec:
        raise ValueError(f"--lm-eval-task {path}: not an lm_eval task file (no 'task' key)")

    def local(p: str) -> str:
        return str((path.parent / p).resolve())

    kwargs = spec.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if isinstance(files, str):
        kwargs["data_files"] = local(files)
    elif isinstance(files, list):
        kwargs["data_files"] = [local(f) for f in files]
    elif isinstance(files, dict):
        kwargs["data_files"] = {
            k: [local(f) for f in v] if isinstance(v, list) else local(v) for k, v in files.items()
        }
    if kwargs:
        spec["dataset_kwargs"] = kwargs
    dev = resolve_device(device).type
    torch_dtype = torch_dtype_name(dtype_from_name(dtype))
    with tempfile.TemporaryDirectory() as include:
        (Path(include) / path.name).write_text(yaml.safe_dump(spec), encoding="utf-8")
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},trust_remote_code=True,dtype={torch_dtype}",
            tasks=[spec["task"]],
            task_manager=TaskManager(include_path=include),
            device=dev,
            batch_size=batch_size,
            limit=limit,
        )
    return {"model": str(model_dir), "task": spec["task"], "results": results["results"][spec["task"]]}
