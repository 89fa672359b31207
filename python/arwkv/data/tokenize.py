"""``arwkv tokenize``: a corpus -> a token directory (shards.py), in parallel, in bounded memory;
and :func:`open_data`, how every command reads ``--data`` (a token directory as it is, raw data
tokenized the same way into a temporary one).

The corpus streams through in chunks of records. ``workers`` processes (spawned, each with its
own single-threaded tokenizer) encode chunks while the main process reads the next ones and
writes the finished ones in order, so the output does not depend on the number of workers and at
most a few chunks per worker are in memory at once. The validation split is decided per record
before any is read: record i (of N) is held out when its place in a seeded permutation of [0, N)
is below round(N * fraction), the same records whatever reads them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..files import atomic_directory
from .order import permute
from .records import (
    KINDS,
    RECORD_ERRORS,
    DataError,
    UnlocatedAnswers,
    count_records,
    data_files,
    iter_records,
    one_line,
    preference_pair,
    record_kind,
    record_text,
    sft_example,
)
from .shards import (
    MANIFEST,
    PARTIAL_MARKER,
    SPLITS,
    SplitWriter,
    TokenSet,
    is_token_dir,
    open_tokens,
    token_dtype,
    tokenizer_fingerprint,
    write_manifest,
)

Log = Callable[[str], None]
CHUNK_RECORDS = 512  # records per unit of work
CHUNK_CHARS = 1 << 20  # ... or about this much text, whichever comes first
IN_FLIGHT = 3  # chunks queued per worker: enough to keep it busy, little to hold
RAW_NOTE_BYTES = 50_000_000  # raw --data larger than this: say that arwkv tokenize would do better


# ----------------------------------------------------------------------------- encoding one chunk


class ChunkEncoder:
    """Turns a chunk of records into token arrays per split. The same object runs in the main
    process (one worker) and in each worker process (several). Plain text goes through the
    tokenizer's Rust backend alone; chats and preference pairs need the whole transformers
    tokenizer (its chat template), which ``tokenizer()`` gives (a worker loads it only then)."""

    def __init__(self, backend, eos: int | None, source: str, tokenizer: Callable[[], object]) -> None:
        self.backend, self.eos, self.source, self._tokenizer = backend, eos, source, tokenizer

    @functools.cached_property
    def tokenizer(self):
        return self._tokenizer()

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of texts, as ``tokenizer(text, add_special_tokens=False)`` gives them."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def __call__(self, first: int, records: list[dict], held_out: np.ndarray) -> dict:
        """{split: (tokens, lengths, mask or None)} and the records' kinds counted; records are
        numbered from ``first`` (0-based) in errors."""
        docs: dict[str, list] = {name: [] for name in SPLITS}  # per split: (ids, mask) of each document
        kinds = dict.fromkeys(KINDS, 0)
        texts, text_at = [], []
        for k, record in enumerate(records):
            number = first + k + 1
            split = SPLITS[int(held_out[k])]
            try:
                kind = record_kind(record)
                kinds[kind] += 1
                if kind == "text":
                    texts.append(record_text(record, None))
                    text_at.append((split, len(docs[split])))
                    docs[split].append(None)  # filled below, in one batch
                elif kind == "chat":
                    try:
                        ids, labels = sft_example(record, self.tokenizer)
                        docs[split].append((ids, np.asarray(labels) != -100))
                    except UnlocatedAnswers:  # trains stages 1-2 all the same; stage 3 finds no labels
                        docs[split].append((self.encode_texts([record_text(record, self.tokenizer)])[0]
                                            + ([self.eos] if self.eos is not None else []), None))
                else:
                    for part in preference_pair(record, self.tokenizer):
                        docs[split].append((part, None))
            except RECORD_ERRORS as err:
                raise DataError(f"{self.source}: record {number}: {one_line(err)}") from None
        # the plain texts of the chunk in one call, then put back in their places
        for (name, i), ids in zip(text_at, self.encode_texts(texts), strict=True):
            docs[name][i] = (ids + [self.eos] if self.eos is not None else ids, None)
        out = {}
        for name in SPLITS:
            pieces = docs[name]
            lengths = np.array([len(ids) for ids, _ in pieces], dtype=np.int64)
            tokens = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in pieces), dtype=np.int64,
                                 count=int(lengths.sum()))
            masks = [m if m is not None else np.zeros(len(ids), bool) for ids, m in pieces]
            any_mask = any(m is not None for _, m in pieces)
            mask = np.concatenate(masks).astype(np.uint8) if any_mask else None
            out[name] = (tokens, lengths, mask)
        return {"splits": out, "kinds": kinds}


_worker_encoder: ChunkEncoder | None = None


def _start_worker(backend_json: str, eos: int | None, tokenizer_dir: str, source: str) -> None:
    """A worker process: the tokenizer's backend, single-threaded (the processes are the
    parallelism); transformers (and torch) are imported only if a chat record needs them."""
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (one line)
    from tokenizers import Tokenizer

    def full_tokenizer():
        from ..loading import load_tokenizer, quiet_transformers

        with quiet_transformers():
            return load_tokenizer(tokenizer_dir, "--tokenizer")

    _worker_encoder = ChunkEncoder(Tokenizer.from_str(backend_json), eos, source, full_tokenizer)


def _encode_in_worker(first: int, records: list[dict], held_out: np.ndarray) -> dict:
    return _worker_encoder(first, records, held_out)


# ----------------------------------------------------------------------------- the corpus


def chunks(data: str | os.PathLike, total: int | None,
           held_out: Callable[[np.ndarray], np.ndarray]) -> Iterator[tuple]:
    """(first record index, records, held-out flags) of about CHUNK_RECORDS records or CHUNK_CHARS
    characters each, in order; ``total``: how many records were counted (None: not counted)."""
    batch: list[dict] = []
    chars, first = 0, 0
    for record in iter_records(data):
        if total is not None and first + len(batch) >= total:
            raise DataError(f"{data} changed while it was read (more than the {total} records counted)")
        batch.append(record)
        text = record.get("text") if isinstance(record, dict) else None
        chars += len(text) if isinstance(text, str) else 256
        if len(batch) >= CHUNK_RECORDS or chars >= CHUNK_CHARS:
            yield first, batch, held_out(np.arange(first, first + len(batch)))
            first += len(batch)
            batch, chars = [], 0
    if batch:
        yield first, batch, held_out(np.arange(first, first + len(batch)))


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def source_list(data: str | os.PathLike) -> list[dict]:
    """The files --data reads, with their sizes and modification times (the manifest's sources)."""
    return [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
            for f in data_files(data)]


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """In this process: the tokenizer's batch calls on one thread (--workers 1 means one core)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def tokenize_corpus(data: str | os.PathLike, tokenizer_dir: str | os.PathLike, out: str | os.PathLike, *,
                    workers: int = 0, validation_fraction: float = 0.0, seed: int = 0,
                    overwrite: bool = False, tokenizer=None, log: Log | None = None) -> Path:
    """Tokenizes every record of ``data`` with the tokenizer of checkpoint ``tokenizer_dir`` into
    the token directory ``out`` (written beside it and renamed into place when complete: an
    interrupted run leaves nothing that looks complete, and running again starts over). An
    ``out`` already made from the same sources, tokenizer, fraction and seed is left as it is.
    ``workers`` 0: one per core. Returns ``out``."""
    from ..loading import load_tokenizer, quiet_transformers

    out = Path(out)
    if not 0 <= validation_fraction < 1:
        raise DataError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    if workers < 0:
        raise DataError(f"--workers must be 0 (one per core) or more, got {workers}")
    if Path(data).exists() and is_token_dir(data):
        raise DataError(f"--data {data} is already a token directory; give it to the command that reads it")
    sources = source_list(data)
    for source in sources:  # --overwrite must never remove the data it reads
        if Path(source["path"]).is_relative_to(out.resolve()):
            raise DataError(f"--out {out} holds --data's {source['path']}; write the tokens elsewhere")
    if tokenizer is None:
        with quiet_transformers():
            tokenizer = load_tokenizer(tokenizer_dir, "--tokenizer")
    fingerprint = tokenizer_fingerprint(tokenizer)
    identity = {"sources": sources, "tokenizer": fingerprint, "validation_fraction": validation_fraction,
                "seed": seed}
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if _made_from(out) == identity and not overwrite:
            if log:
                log(f"{out} is up to date (same sources, tokenizer, split); nothing to do")
            return out
        if not overwrite:
            raise DataError(f"--out {out} exists and is not empty (or holds other tokens); pass --overwrite "
                            "to replace it")
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # what an interrupted run left
        shutil.rmtree(stale, ignore_errors=True)

    start = time.perf_counter()
    # the split needs N before the first record is read: a quick counting pass, only then
    records = count_records(data) if validation_fraction else None
    held_count = round(records * validation_fraction) if records else 0

    def held_out(index: np.ndarray) -> np.ndarray:
        return permute(index, records, seed) < held_count if held_count else np.zeros(len(index), bool)

    dtype = token_dtype(len(tokenizer))
    workers = workers or default_workers()
    if log:
        counted = f"{records:,} records of " if records is not None else ""
        log(f"tokenizing {counted}{data} ({sum(s['bytes'] for s in sources):,} bytes) with "
            f"{workers} worker(s) into {out}")
    kinds = dict.fromkeys(KINDS, 0)
    with atomic_directory(out) as tmp:
        (tmp / PARTIAL_MARKER).touch()
        writers = {name: SplitWriter(tmp / name, dtype) for name in SPLITS}
        encoded = _encoded_chunks(data, records, tokenizer, tokenizer_dir, workers, held_out)
        with contextlib.closing(encoded) as results:  # (on an error too: the worker pool goes at once)
            for result in results:
                for kind, n in result["kinds"].items():
                    kinds[kind] += n
                for name, (tokens, lengths, mask) in result["splits"].items():
                    if len(tokens) and int(tokens.max()) >= np.iinfo(dtype).max + 1:
                        raise DataError(f"token id {int(tokens.max())} does not fit {dtype}")
                    writers[name].append(tokens, lengths, mask)
        documents = sum(kinds.values()) - kinds["preference"]
        if kinds["preference"] and documents:
            raise DataError(f"{data}: mixes {kinds['preference']} preference pairs with {documents} "
                            "documents; tokenize them apart")
        if kinds["chat"]:  # chat data: both splits carry loss masks (a split without chat: zeros)
            for writer in writers.values():
                writer.open_mask()
        splits = {name: w.close() for name, w in writers.items()}
        seconds = time.perf_counter() - start
        write_manifest(tmp, {
            "tokenizer": {"fingerprint": fingerprint, "path": str(Path(tokenizer_dir).resolve()),
                          "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id},
            "token_dtype": dtype.name, "sources": sources, "records": kinds,
            "validation_fraction": validation_fraction, "seed": seed, "splits": splits,
            "made": {"workers": workers, "seconds": round(seconds, 3)},
        })
        (tmp / PARTIAL_MARKER).unlink()
    if log:
        tokens = sum(s["tokens"] for s in splits.values())
        documents = sum(s["documents"] for s in splits.values())
        log(f"wrote {out}: {tokens:,} tokens ({dtype.name}) in {documents:,} "
            f"documents, {splits['validation']['documents']:,} held out, in {seconds:.1f} s "
            f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return out


def _made_from(out: Path) -> dict | None:
    """The inputs a complete token directory was made from (None: not one)."""
    try:
        m = json.loads((out / MANIFEST).read_text())
        return {"sources": m["sources"], "tokenizer": m["tokenizer"]["fingerprint"],
                "validation_fraction": m["validation_fraction"], "seed": m["seed"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _encoded_chunks(data, total: int | None, tokenizer, tokenizer_dir, workers: int,
                    held_out) -> Iterator[dict]:
    """The encoded chunks of ``data`` in order: in this process (one worker), or from ``workers``
    spawned processes with at most IN_FLIGHT chunks each queued."""
    source = str(data)
    if workers == 1:
        encoder = ChunkEncoder(tokenizer.backend_tokenizer, tokenizer.eos_token_id, source, lambda: tokenizer)
        with _single_threaded_tokenizers():
            for chunk in chunks(data, total, held_out):
                yield encoder(*chunk)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: a forked child of a process whose tokenizer used its threads can deadlock;
    # a worker that dies (or fails to start) breaks the pool, which raises here: nothing hangs
    context = multiprocessing.get_context("spawn")
    start = (tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id, str(tokenizer_dir), source)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=start) as pool:
        pending: deque = deque()
        try:
            for chunk in chunks(data, total, held_out):
                pending.append(pool.submit(_encode_in_worker, *chunk))
                if len(pending) >= IN_FLIGHT * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as err:
            raise DataError(f"a tokenizer worker process died ({err}); try --workers 1") from None
        finally:
            for future in pending:
                future.cancel()


# ----------------------------------------------------------------------------- reading --data


def open_data(data: str | os.PathLike, tokenizer, *, validation_fraction: float = 0.0, seed: int = 0,
              flag: str = "--data", whose: str = "the model", log: Log | None = None) -> TokenSet:
    """What a command reads from ``--data``: a token directory, checked against ``tokenizer``
    (its fingerprint) and against the split asked for (a fraction > 0 must be the one it was
    made with); or raw data, tokenized in this process into a temporary token directory (removed
    with the returned set), split with ``validation_fraction`` and ``seed``."""
    p = Path(data)
    if not p.exists():
        raise DataError(f"{flag} {p} does not exist")
    if is_token_dir(p):
        tokens = open_tokens(p, flag)
        try:
            tokens.check_tokenizer(tokenizer, whose)
            made_with = (tokens.validation_fraction, tokens.seed)
            if validation_fraction and (validation_fraction, seed) != made_with:
                raise DataError(
                    f"--validation-fraction {validation_fraction} with --seed {seed}: {flag} {p} holds the "
                    f"split made at tokenize time (fraction {made_with[0]}, seed {made_with[1]}); leave "
                    "--validation-fraction out to use it, or tokenize again"
                )
        except BaseException:
            tokens.close()
            raise
        return tokens
    size = sum(f.stat().st_size for f in data_files(p))
    if log and size > RAW_NOTE_BYTES:  # (small data goes quietly)
        log(f"tokenizing {p} ({size / 1e6:,.0f} MB) in this process; for data this large, run arwkv "
            "tokenize once (in parallel) and pass its directory")
    keep = tempfile.TemporaryDirectory(prefix="arwkv-tokens-")
    try:
        out = tokenize_corpus(p, tokenizer.name_or_path, Path(keep.name) / "tokens", workers=1,
                              validation_fraction=validation_fraction, seed=seed, tokenizer=tokenizer)
        tokens = open_tokens(out, flag)
    except BaseException:
        keep.cleanup()
        raise
    tokens.keep_alive = keep
    return tokens



def scored_documents(data: str | os.PathLike, tokenizer, validation_fraction: float = 0.0,
                     seed: int = 0) -> Iterator[np.ndarray]:
    """The token ids of each document an evaluation scores, read as they are asked for: those of
    the validation split when validation_fraction > 0 (the split arwkv distill holds out with that
    fraction and seed; a token directory's own), else every document of ``data``."""
    tokens = open_data(data, tokenizer, validation_fraction=validation_fraction, seed=seed)
    try:
        yield from tokens.iter_documents("validation" if validation_fraction else "all")
    finally:
        tokens.close()
