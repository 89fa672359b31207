"""``arwkv long-context``: how a causal LM (a Transformer teacher, an RWKV-7 student, a
hybrid) uses a long context, measured two ways for one or more checkpoints, into one JSON file
and one figure.

**Loss by position.** Held-out documents become sequences of exactly ``max_len`` tokens: a
document of at least ``max_len`` tokens is cut into ``max_len``-token pieces from its start; the
shorter ones (and the long ones' tails) are concatenated in their order, the tokenizer's EOS
after each, and the stream is cut into ``max_len``-token sequences (a last shorter piece is
dropped). Each sequence is scored in one forward from an empty context (no windowing, no
cache), so the token at position t (0-based) is predicted from exactly t tokens of context;
positions 1 ... max_len - 1 are predicted. The mean next-token loss (nats) is reported per
position bucket [start, end) (log-spaced by default, so that short contexts are resolved
finely), with the token count and the standard error of the mean over sequences, and overall.

**Passkey retrieval.** A random 5-digit key is hidden at several depths (the fraction of the
filler tokens before it: 0 = right after the instructions, 1 = right before the question) in
repeated filler sentences, in prompts of several total lengths (in the model's own tokens,
whole sentences, so a prompt is shorter than asked by less than the shortest sentence). The prompt ends with
"What is the pass key? The pass key is"; a trial is correct when the digits of the greedy
continuation (with the cache, ``new_tokens`` tokens) contain the key. The keys come from the
seed, the length, the depth and the trial number only, so every model sees the same prompts
(given one tokenizer).

The JSON file is one object: ``settings`` (everything needed to reproduce and read the numbers)
and ``models``, one entry per checkpoint in the order given, each with its ``loss_by_position``,
its ``passkey`` grid and its ``cache_bytes`` (constant and per-token cache memory).
"""

from __future__ import annotations

import gc
import io
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.records import DataError
from ..data.tokenize import scored_documents
from ..files import write_atomic
from ..loading import check_checkpoint_dir, load_causal_lm, load_tokenizer
from ..options import LongContextOptions, parse_number_list
from ..runtime import ConfigError, dtype_from_name, mix_seed, resolve_device

Tensor = torch.Tensor
Log = Callable[[str], None]

JSON_NAME = "long_context.json"
PNG_NAME = "long_context.png"

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
SPACINGS = ("log", "linear")
# Logits are turned into float32 losses this many positions at a time, so that a large
# vocabulary never needs a second [B, T, V] float32 copy of the logits.
LOSS_CHUNK = 512

POSITIONS = (
    "t: 0-based index of the predicted token in its sequence, so predicted from exactly t tokens of "
    "context (1 <= t < max_len); every sequence scored in one forward from an empty context"
)
SEQUENCES = (
    "documents of >= max_len tokens cut into max_len-token pieces from their start; shorter documents "
    "(and the long ones' tails) concatenated in order, the tokenizer's EOS after each, and cut into "
    "max_len-token sequences; the last, shorter piece dropped"
)


# ---------------------------------------------------------------------------------------------
# Settings and their command-line spellings


def parse_buckets(text: str) -> int | list[int]:
    """``--buckets``: ``"16"`` (that many buckets) or ``"1,64,512,2048"`` (the edges themselves)."""
    values = parse_number_list(str(text), "buckets", int)
    return values[0] if len(values) == 1 and "," not in str(text) else values


def bucket_edges(max_len: int, buckets: int | Sequence[int] = 16, spacing: str = "log") -> list[int]:
    """The edges e_0 < ... < e_k of the position buckets [e_i, e_{i+1}) over the predicted
    positions 1 ... max_len - 1.

    ``buckets`` an int: that many buckets from 1 to max_len, ``log``-spaced (equal ratios: short
    contexts resolved finely) or ``linear``; rounding to whole positions merges buckets that would
    be narrower than one position, so fewer may come back (the JSON states the edges used).
    ``buckets`` a sequence: the edges themselves, strictly increasing, with 1 <= e_0 and
    e_k <= max_len (positions outside them are in no bucket, but in the overall mean)."""
    if max_len < 2:
        raise ValueError(f"--max-len must be at least 2 (one predicted token), got {max_len}")
    if spacing not in SPACINGS:
        raise ValueError(f"bucket spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    if isinstance(buckets, int):
        if not 1 <= buckets < max_len:
            raise ValueError(f"--buckets {buckets}: give 1 to {max_len - 1} buckets for --max-len {max_len}")
        if spacing == "log":
            points = [max_len ** (i / buckets) for i in range(buckets + 1)]
        else:
            points = [1 + (max_len - 1) * i / buckets for i in range(buckets + 1)]
        edges = sorted({round(p) for p in points} | {1, max_len})
        return edges
    edges = list(buckets)
    if len(edges) < 2:
        raise ValueError("--buckets: give at least two edges (or a number of buckets)")
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"--buckets: edges {edges} are not strictly increasing")
    if edges[0] < 1 or edges[-1] > max_len:
        raise ValueError(
            f"--buckets: edges must lie in [1, --max-len {max_len}], got {edges[0]} ... {edges[-1]}"
        )
    return edges


def default_passkey_lengths(max_len: int) -> list[int]:
    """Powers of two from 256 below ``max_len``, then ``max_len`` itself (just ``max_len`` when it
    is 256 or less): 2048 -> [256, 512, 1024, 2048]."""
    lengths, n = [], 256
    while n < max_len:
        lengths.append(n)
        n *= 2
    return lengths + [max_len]


def check_settings(settings: LongContextOptions) -> None:
    """Refuses, in one line naming the flag, settings that cannot run (before any model loads);
    the declared checks (required, choices, least values) are the options class's own."""
    settings.validate()
    settings_edges(settings)
    for length in settings_lengths(settings):
        if not 2 <= length <= settings.max_len:
            raise ConfigError(f"--passkey-lengths: {length} is outside [2, --max-len {settings.max_len}]")
    for depth in settings.passkey_depths:
        if not 0.0 <= depth <= 1.0:  # also refuses nan
            raise ConfigError(f"--passkey-depths: {depth:g} is outside [0, 1]")
    if not settings.passkey_depths:
        raise ConfigError("--passkey-depths: give at least one depth")
    repeatable: tuple[tuple[str, list], ...] = (("--passkey-lengths", settings_lengths(settings)),
                                               ("--passkey-depths", list(settings.passkey_depths)))
    for flag, values in repeatable:
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ConfigError(f"{flag}: {twice[0]:g} is given twice")


def settings_edges(settings: LongContextOptions) -> list[int]:
    """The position buckets' edges (see bucket_edges)."""
    return bucket_edges(settings.max_len, parse_buckets(settings.buckets), settings.bucket_spacing)


def settings_lengths(settings: LongContextOptions) -> list[int]:
    """The passkey prompts' total lengths in tokens."""
    if settings.passkey_lengths:
        return list(settings.passkey_lengths)
    return default_passkey_lengths(settings.max_len)


def describe_settings(settings: LongContextOptions) -> dict:
    """The settings as the JSON states them (with what the numbers mean)."""
    requested = parse_buckets(settings.buckets)
    out = {
        "max_len": settings.max_len,
        "positions": POSITIONS,
        "buckets": {
            "spacing": settings.bucket_spacing if isinstance(requested, int) else "given",
            "requested": requested,
            "edges": settings_edges(settings),
            "interval": "[start, end) of positions t",
        },
        "loss": "mean next-token cross-entropy in nats; sem: standard error of the bucket mean "
        "over sequences",
        "data": settings.data,
        "validation_fraction": settings.validation_fraction,
        "sequences": SEQUENCES,
        "max_sequences": settings.max_sequences,
        "passkey": None,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "device": settings.device,
        "dtype": settings.dtype,
    }
    if settings.passkey_trials:
        out["passkey"] = {
            "lengths": settings_lengths(settings),
            "depths": list(settings.passkey_depths),
            "trials": settings.passkey_trials,
            "new_tokens": settings.passkey_new_tokens,
            "key": "5-digit, from the seed, the length, the depth and the trial",
            "depth": "fraction of the filler tokens before the key sentence",
            "correct": "the digits of the greedy continuation contain the key",
            "intro": INTRO,
            "filler": list(FILLER),
            "key_sentence": KEY_SENTENCE,
            "question": QUESTION,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Progress on stderr


class Ticker:
    """Progress of a long loop: tqdm's bar on a terminal, else a plain line through ``log`` at
    every tenth of the way (logs, CI); silent when ``log`` is None."""

    def __init__(self, total: int, label: str, log: Log | None) -> None:
        self.total, self.label, self.log, self.done = max(total, 1), label, log, 0
        self.start = time.perf_counter()
        self.bar = None
        if log is not None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        elif self.log is not None and (self.done * 10 // self.total > before * 10 // self.total):
            self.log(f"{self.label}: {self.done}/{self.total} ({time.perf_counter() - self.start:.0f} s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Loss by position


@dataclass
class Sequences:
    """The token sequences scored by position (each exactly max_len ids) and how they were made."""

    rows: list[list[int]]
    whole: list[bool]  # per row: cut from one document of >= max_len tokens (not a concatenation)
    documents: int
    tokens_dropped: int  # the last, shorter piece of the concatenation

    @property
    def from_long_documents(self) -> int:
        """How many rows were cut from one long document."""
        return sum(self.whole)

    def head(self, n: int | None) -> Sequences:
        """The first n rows (all of them when n is None)."""
        if n is None or n >= len(self.rows):
            return self
        return Sequences(self.rows[:n], self.whole[:n], self.documents, self.tokens_dropped)


def long_context_sequences(docs: Sequence[list[int]], max_len: int) -> Sequences:
    """Token-id documents (each already ending in EOS, as arwkv tokenizes them) ->
    sequences of exactly max_len tokens: a document of >= max_len tokens gives max_len-token pieces
    from its start; the shorter documents and the long ones' tails are concatenated in order and
    cut into max_len-token sequences, the last shorter piece dropped. Rows come in document order."""
    if max_len < 2:
        raise ValueError(f"--max-len must be at least 2, got {max_len}")
    rows: list[list[int]] = []
    whole: list[bool] = []
    pool: list[int] = []
    for doc in docs:
        full = len(doc) // max_len * max_len
        for i in range(0, full, max_len):
            rows.append(list(doc[i : i + max_len]))
            whole.append(True)
        pool.extend(doc[full:])
        while len(pool) >= max_len:
            rows.append(pool[:max_len])
            whole.append(False)
            del pool[:max_len]
    return Sequences(rows, whole, len(docs), len(pool))


@dataclass
class PositionLosses:
    """Next-token losses of a causal LM over sequences of L tokens, summed by position."""

    nll_sum: Tensor  # [L] float64: summed NLL of the token at position t over sequences (t = 0: 0)
    count: Tensor  # [L] int64: how many sequences predicted position t (0 at t = 0)
    bucket_sums: Tensor  # [S, K] float64: per sequence, its summed NLL over each of the K buckets
    edges: list[int]  # the K + 1 bucket edges

    def per_position(self) -> Tensor:
        """[L] float64: the mean loss at each position (nan at t = 0, never predicted)."""
        return self.nll_sum / self.count.clamp(min=1).double() * torch.where(self.count > 0, 1.0, math.nan)

    def summary(self) -> dict:
        """Per bucket: start, end (exclusive), mean loss, perplexity, predicted tokens and the
        standard error of the mean over sequences; and the overall mean loss over all positions."""
        sequences = self.bucket_sums.shape[0]
        rows = []
        for i, (start, end) in enumerate(zip(self.edges, self.edges[1:], strict=False)):
            tokens = int(self.count[start:end].sum())
            mean = float(self.nll_sum[start:end].sum()) / max(tokens, 1)
            # every sequence predicts all of [start, end): its mean over the bucket
            per_sequence = self.bucket_sums[:, i] / (end - start)
            sem = float(per_sequence.std() / math.sqrt(sequences)) if sequences > 1 else None
            rows.append({"start": start, "end": end, "mean_loss": mean, "perplexity": math.exp(mean),
                         "tokens": tokens, "sem": sem})
        tokens = int(self.count.sum())
        mean = float(self.nll_sum.sum()) / max(tokens, 1)
        return {"buckets": rows, "mean_loss": mean, "perplexity": math.exp(mean), "tokens": tokens,
                "sequences": sequences}


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters are."""
    return next(model.parameters()).device


def token_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """logits [B, T, V] (any float dtype), ids [B, T] -> [B, T - 1] float32: the NLL of token t + 1
    given tokens 0 ... t, computed in float32, LOSS_CHUNK positions at a time."""
    B, T = ids.shape
    out = torch.empty(B, T - 1, dtype=torch.float32, device=logits.device)
    for s in range(0, T - 1, LOSS_CHUNK):
        e = min(s + LOSS_CHUNK, T - 1)
        out[:, s:e] = F.cross_entropy(
            logits[:, s:e].flatten(0, 1).float(), ids[:, s + 1 : e + 1].flatten(), reduction="none"
        ).view(B, e - s)
    return out


@torch.no_grad()
def score_positions(model: torch.nn.Module, rows: Sequence[Sequence[int]], edges: Sequence[int],
                    batch_size: int = 1, log: Log | None = None,
                    label: str = "loss by position") -> PositionLosses:
    """Scores each row (all of one length L) in one forward from an empty context (no cache) and
    sums the next-token NLL by position and, per row, by bucket [e_i, e_{i+1})."""
    if not rows:
        raise DataError("no sequence to score")
    L = len(rows[0])
    if any(len(r) != L for r in rows):
        raise ValueError("score_positions: the rows must all have the same length")
    if edges[-1] > L:
        raise ValueError(f"score_positions: bucket edge {edges[-1]} is beyond the rows' length {L}")
    device = model_device(model)
    nll_sum = torch.zeros(L, dtype=torch.float64)
    count = torch.zeros(L, dtype=torch.int64)
    starts, ends = torch.tensor(edges[:-1]), torch.tensor(edges[1:])
    bucket_sums = []
    ticker = Ticker(len(rows), label, log)
    for i in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[i : i + batch_size], device=device)  # [B, L]
        logits = model(ids, use_cache=False).logits  # [B, L, V]
        nll = F.pad(token_losses(logits, ids).double().cpu(), (1, 0))  # [B, L]: position t at column t
        del logits
        nll_sum += nll.sum(0)
        count[1:] += ids.shape[0]
        cumulative = F.pad(nll.cumsum(1), (1, 0))  # [B, L + 1]: column j sums the positions < j
        bucket_sums.append(cumulative[:, ends] - cumulative[:, starts])  # [B, K]
        ticker.advance(ids.shape[0])
    ticker.close()
    return PositionLosses(nll_sum, count, torch.cat(bucket_sums), list(edges))


def load_sequences(tokenizer, data: str | Path, max_len: int, *, validation_fraction: float = 0.0,
                   seed: int = 0, max_sequences: int | None = None) -> Sequences:
    """``data`` (any format arwkv distill reads; its validation split when validation_fraction > 0)
    tokenized and made into max_len-token sequences (long_context_sequences), the first
    ``max_sequences`` kept."""
    docs = [d.tolist() for d in scored_documents(data, tokenizer, validation_fraction, seed)]
    sequences = long_context_sequences(docs, max_len)
    if not sequences.rows:
        total = sum(len(d) for d in docs)
        raise DataError(f"{data} gives {total} tokens, fewer than --max-len {max_len}: no sequence to score")
    return sequences.head(max_sequences)


def loss_by_position(model: torch.nn.Module, sequences: Sequences, edges: Sequence[int],
                     batch_size: int = 1, log: Log | None = None, label: str = "loss by position") -> dict:
    """The ``loss_by_position`` entry of a model: PositionLosses.summary() of the sequences, with
    how they were made and the seconds it took."""
    start = time.perf_counter()
    summary = score_positions(model, sequences.rows, edges, batch_size, log, label).summary()
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()
    summary.update(
        sequences_from_long_documents=sequences.from_long_documents,
        documents=sequences.documents,
        tokens_dropped=sequences.tokens_dropped,
        seconds=time.perf_counter() - start,
    )
    return summary


# ---------------------------------------------------------------------------------------------
# Passkey retrieval


@dataclass
class PasskeyPrompt:
    """One passkey prompt in token ids, and where its key is."""

    ids: list[int]
    key: int
    key_start: int  # index in ids of the key sentence's first token
    filler_tokens: int  # tokens of filler around the key
    depth: float  # the key's actual depth: filler tokens before it / filler_tokens


def passkey_key(seed: int, length: int, depth: float, trial: int) -> int:
    """The 5-digit key of one trial: a function of the seed, the length, the depth and the trial
    only, so that every model is asked the same questions."""
    return random.Random(mix_seed(seed, length, round(depth * 10**6), trial)).randint(10000, 99999)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> PasskeyPrompt:
    """A prompt of at most ``length`` tokens (fewer by less than the shortest filler sentence): the
    instructions, filler sentences with the key sentence placed so that the fraction ``depth`` of
    the filler tokens precedes it (at the nearest sentence boundary), and the question. The parts
    are tokenized separately, each after a space (as they appear in the text), and joined; a
    tokenizer that adds a BOS token gets one in front."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"--passkey-depths: {depth} is outside [0, 1]")
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and getattr(tokenizer, "add_bos_token", False) else []
    intro = prefix + _encode(tokenizer, INTRO)
    key_ids = _encode(tokenizer, " " + KEY_SENTENCE.format(key=key))
    question = _encode(tokenizer, " " + QUESTION)
    sentences = [_encode(tokenizer, " " + s) for s in FILLER]
    budget = length - len(intro) - len(key_ids) - len(question)
    filler: list[list[int]] = []
    used = 0
    while used + len(sentences[len(filler) % len(sentences)]) <= budget:  # the sentences in turn
        filler.append(sentences[len(filler) % len(sentences)])
        used += len(filler[-1])
    while fitting := [s for s in sentences if used + len(s) <= budget]:  # then the longest that fit
        filler.append(max(fitting, key=len))
        used += len(filler[-1])
    if not filler:
        fixed = len(intro) + len(key_ids) + len(question)
        raise ValueError(f"--passkey-lengths: {length} tokens is too short: the instructions, key and "
                         f"question alone take {fixed} tokens, and at least one filler sentence must fit")
    boundaries = [0]
    for s in filler:
        boundaries.append(boundaries[-1] + len(s))
    k = min(range(len(boundaries)), key=lambda i: abs(boundaries[i] - depth * used))
    before = [t for s in filler[:k] for t in s]
    after = [t for s in filler[k:] for t in s]
    ids = intro + before + key_ids + after + question
    return PasskeyPrompt(ids, key, len(intro) + len(before), used, boundaries[k] / used)


def _next_step(model: torch.nn.Module, token: Tensor, previous) -> object:
    """One decoding step after ``previous``'s output: with ``cache=`` (a student, and
    transformers from 5.x) or ``past_key_values=`` (older transformers)."""
    cache = getattr(previous, "cache", None)
    if cache is not None:
        return model(token, cache=cache, use_cache=True)
    return model(token, past_key_values=previous.past_key_values, use_cache=True)


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, ids: Tensor, new_tokens: int) -> Tensor:
    """ids [B, P] (prompts of equal length, no padding) -> [B, new_tokens]: the greedy
    continuation, one forward per token with the cache after a prefill of the prompt."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1)]  # [B]
    for _ in range(new_tokens - 1):
        out = _next_step(model, tokens[-1][:, None], out)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


def contains_key(answer: str, key: int) -> bool:
    """A trial is correct when the digits of the answer, in order, contain the key."""
    return str(key) in re.sub(r"\D", "", answer)


def answer_prompts(model: torch.nn.Module, tokenizer, prompts: Sequence[PasskeyPrompt], new_tokens: int,
                   batch_size: int = 1) -> list[str]:
    """The decoded greedy continuation of each prompt; prompts of equal length share a forward
    (up to batch_size of them)."""
    device = model_device(model)
    answers = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p.ids), []).append(i)
    for group in by_length.values():
        for s in range(0, len(group), batch_size):
            part = group[s : s + batch_size]
            ids = torch.tensor([prompts[i].ids for i in part], device=device)
            generated = greedy_tokens(model, ids, new_tokens).cpu()
            for i, row in zip(part, generated, strict=True):
                answers[i] = tokenizer.decode(row.tolist(), skip_special_tokens=True)
    return answers


def passkey_grid(model: torch.nn.Module, tokenizer, lengths: Sequence[int], depths: Sequence[float],
                 trials: int, *, seed: int = 0, new_tokens: int = 10, batch_size: int = 1,
                 log: Log | None = None, label: str = "passkey") -> dict:
    """Passkey retrieval accuracy per (length, depth) cell over ``trials`` trials each, and
    overall; each cell also gives the prompts' actual token counts and key depth, and the first
    trial's answer (to see what the model says)."""
    start = time.perf_counter()
    cells = []
    ticker = Ticker(len(lengths) * len(depths), label, log)
    for length in lengths:
        for depth in depths:
            prompts = [passkey_prompt(tokenizer, length, depth, passkey_key(seed, length, depth, t))
                       for t in range(trials)]
            answers = answer_prompts(model, tokenizer, prompts, new_tokens, batch_size)
            correct = sum(contains_key(a, p.key) for a, p in zip(answers, prompts, strict=True))
            cells.append({
                "length": length,
                "depth": depth,
                "prompt_tokens": [min(len(p.ids) for p in prompts), max(len(p.ids) for p in prompts)],
                "key_depth": sum(p.depth for p in prompts) / trials,
                "trials": trials,
                "correct": correct,
                "accuracy": correct / trials,
                "example": {"key": prompts[0].key, "answer": answers[0]},
            })
            ticker.advance()
    ticker.close()
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()
    total = sum(c["trials"] for c in cells)
    return {"grid": cells, "accuracy": sum(c["correct"] for c in cells) / max(total, 1),
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def model_names(model_dirs: Sequence[str | Path]) -> list[str]:
    """Short names for the figure and the JSON: each directory's own name, or its whole path
    where two would share one."""
    names = [Path(d).name or str(d) for d in model_dirs]
    return [str(d) if names.count(n) > 1 else n for n, d in zip(names, model_dirs, strict=True)]


def describe_model(name: str, model_dir: str | Path, model: torch.nn.Module) -> dict:
    """What the JSON says about a model besides its numbers."""
    config = model.config
    return {
        "name": name,
        "model": str(model_dir),
        "model_type": getattr(config, "model_type", None),
        "layers": getattr(config, "num_hidden_layers", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def evaluate_long_context(settings: LongContextOptions, log: Log | None = None) -> dict:
    """Loss by position on ``settings.data`` and passkey retrieval, for each checkpoint of
    ``settings.model`` in turn (one loaded at a time), plus each one's cache memory; writes
    OUT/long_context.json and OUT/long_context.png (atomically; an existing pair only with
    ``overwrite``) and returns the JSON's object."""
    from .perplexity import cache_growth

    check_settings(settings)
    model_dirs, out = list(settings.model), Path(settings.out)
    for d in model_dirs:
        check_checkpoint_dir(d, "--model")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    existing = [out / name for name in (JSON_NAME, PNG_NAME) if (out / name).exists()]
    if existing and not settings.overwrite:
        raise ConfigError(f"--out {out} already holds {existing[0].name} (--overwrite replaces it)")
    device = resolve_device(settings.device)
    dtype = dtype_from_name(settings.dtype)
    if settings.data and not Path(settings.data).exists():
        raise DataError(f"--data {settings.data} does not exist")
    edges = settings_edges(settings)
    lengths = settings_lengths(settings)
    # Every model's tokenizer and data first, so that a passkey length too short for a tokenizer
    # or data too short for --max-len is refused before any weights load.
    prepared = []
    for model_dir in model_dirs:
        tokenizer = load_tokenizer(model_dir)
        if settings.passkey_trials:
            passkey_prompt(tokenizer, min(lengths), 0.0, 10000)
        sequences = None
        if settings.data:
            sequences = load_sequences(tokenizer, settings.data, settings.max_len,
                                       validation_fraction=settings.validation_fraction, seed=settings.seed,
                                       max_sequences=settings.max_sequences)
        prepared.append((tokenizer, sequences))
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": describe_settings(settings) | {"device": device.type}, "models": []}
    names = model_names(model_dirs)
    for name, model_dir, (tokenizer, sequences) in zip(names, model_dirs, prepared, strict=True):
        model, _ = load_causal_lm(model_dir, device, dtype)
        entry = describe_model(name, model_dir, model)
        trained = entry["max_position_embeddings"]
        if log and trained and settings.max_len > trained:
            log(f"{name}: note: --max-len {settings.max_len} is beyond its max_position_embeddings {trained}")
        probe: list[int] = []
        if sequences is not None:
            if log:
                log(f"{name}: loss by position over {len(sequences.rows)} sequences of "
                    f"{settings.max_len} tokens")
            entry["loss_by_position"] = loss_by_position(model, sequences, edges, settings.batch_size, log,
                                                         f"{name}: loss by position")
            probe = sequences.rows[0]
        if settings.passkey_trials:
            if log:
                log(f"{name}: passkey retrieval at lengths {lengths} x depths {settings.passkey_depths} x "
                    f"{settings.passkey_trials} trials")
            entry["passkey"] = passkey_grid(model, tokenizer, lengths, settings.passkey_depths,
                                            settings.passkey_trials, seed=settings.seed,
                                            new_tokens=settings.passkey_new_tokens,
                                            batch_size=settings.batch_size, log=log, label=f"{name}: passkey")
            if not probe:
                probe = passkey_prompt(tokenizer, lengths[0], 0.5, 12345).ids
        entry["cache_bytes"] = cache_growth(model, probe)
        report["models"].append(entry)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_atomic(out / PNG_NAME, plot_long_context(report))
    write_atomic(out / JSON_NAME, _json(report))
    if log:
        log(f"wrote {out / JSON_NAME}, {out / PNG_NAME}")
    return report


def _json(report: dict) -> str:
    import json

    return json.dumps(report, indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# The figure


def _bucket_centres(buckets: list[dict], log_scale: bool) -> list[float]:
    """Where a bucket [start, end) is drawn: the geometric (log axis) or arithmetic middle of its
    first and last position."""
    if log_scale:
        return [math.sqrt(b["start"] * (b["end"] - 1)) for b in buckets]
    return [(b["start"] + b["end"] - 1) / 2 for b in buckets]


def plot_long_context(report: dict, markers: dict[str, int] | None = None) -> bytes:
    """The PNG of a long-context report (long_context_figure)."""
    import matplotlib.pyplot as plt

    fig = long_context_figure(report, markers)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def long_context_figure(report: dict, markers: dict[str, int] | None = None):
    """Loss by position of every model on one axes (with the standard error as a band), and a
    passkey accuracy heatmap (depth x length) per model. ``markers``: labelled vertical lines on
    the loss axes (e.g. training context lengths), drawn where they fall inside the scored
    positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = report["models"]
    with_loss = [m for m in models if m.get("loss_by_position")]
    with_passkey = [m for m in models if m.get("passkey")]
    columns = max(len(with_passkey), 1)
    rows = int(bool(with_loss)) + int(bool(with_passkey))
    fig = plt.figure(figsize=(max(7.0, 3.6 * columns), 4.2 * rows))
    grid = fig.add_gridspec(rows, columns)
    row = 0
    settings = report["settings"]
    if with_loss:
        ax = fig.add_subplot(grid[0, :])
        log_scale = settings["buckets"]["spacing"] != "linear"
        for m in with_loss:
            buckets = m["loss_by_position"]["buckets"]
            x = _bucket_centres(buckets, log_scale)
            y = [b["mean_loss"] for b in buckets]
            mean = m["loss_by_position"]["mean_loss"]
            (line,) = ax.plot(x, y, "o-", label=f"{m['name']} (mean {mean:.3f})")
            sem = [b["sem"] for b in buckets]
            if all(s is not None for s in sem):
                low = [a - s for a, s in zip(y, sem, strict=True)]
                high = [a + s for a, s in zip(y, sem, strict=True)]
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        last = settings["buckets"]["edges"][-1]
        for i, (label, position) in enumerate((markers or {}).items()):
            if position <= last:  # a marker beyond the scored positions would stretch the axis past the data
                ax.axvline(position, color="gray", linestyle=":" if i % 2 else "--", linewidth=1, label=label)
        if log_scale:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("position t (tokens of context before the predicted token)")
        ax.set_ylabel("mean next-token loss (nats)")
        sequences = with_loss[0]["loss_by_position"]["sequences"]
        ax.set_title(f"Loss by position: {sequences} sequence{'s' if sequences != 1 else ''} of "
                     f"{settings['max_len']} tokens, each from an empty context", fontsize="medium")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
        row = 1
    for column, m in enumerate(with_passkey):
        ax = fig.add_subplot(grid[row, column])
        cells = m["passkey"]["grid"]
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        accuracy = torch.full((len(depths), len(lengths)), math.nan)
        for c in cells:
            accuracy[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
        ax.imshow(accuracy.numpy(), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                value = accuracy[i, j].item()
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small",
                        color="white" if value < 0.2 or value > 0.85 else "black")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45 if len(lengths) > 4 else 0)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        if column == 0:
            ax.set_ylabel("key depth")
        ax.set_title(f"{m['name']}: passkey {m['passkey']['accuracy']:.2f}", fontsize="medium")
    fig.tight_layout()
    return fig

