"""Token shards: a corpus tokenized once (``arwkv tokenize``), read back without loading it.

A token directory holds::

    manifest.json                  written last: what the files are (below); no manifest, no data
    train/tokens.bin               every training document's token ids, one after another
    train/documents.bin            int64 [D + 1]: where document d starts (d = D: the end)
    train/loss_mask.bin            uint8, one per token: 1 where stage 3 (SFT) takes its loss
                                   (the assistant tokens of chat records); only for chat data
    validation/...                 the same for the documents held out for validation

Tokens are uint16 when the tokenizer's ids all fit (< 65536), else uint32 (Qwen2's 151k
vocabulary needs uint32). A preference pair (stage 4) is three consecutive documents: prompt,
chosen answer, rejected answer.

Why this format: flat little-endian arrays with a separate offset index (as nanoGPT and
Megatron-core store tokens) are read at any position with one ``pread`` and mapped by numpy with
no parsing, so opening a corpus of billions of tokens costs the same as opening a small one, and
rows can be cut from them lazily. Arrow (``datasets``) would add a per-row list layout and a
second copy of the corpus for the same reads. The manifest records the tokenizer's fingerprint
(a hash of everything that decides the ids), the sources with their sizes, the counts and each
file's size and a digest of its ends, so a shard set made with another tokenizer, a truncated or
altered file, or a directory whose writer was interrupted is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import DataError

FORMAT = "arwkv-tokens"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
TOKENS, DOCUMENTS, LOSS_MASK = "tokens.bin", "documents.bin", "loss_mask.bin"
PARTIAL_MARKER = ".arwkv-tokenize-partial"  # in a directory being written; gone once it is complete
_ENDS = 1 << 16  # bytes at each end of a file that its digest covers


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits that change whenever the token ids of some text could: the fast tokenizer's
    whole definition (vocabulary, merges, normalizer, pre-tokenizer, added tokens), its chat
    template and its EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; arwkv needs one")
    definition = json.loads(backend.to_str())
    for state in ("truncation", "padding"):  # call-time settings transformers changes, not the ids' rules
        definition.pop(state, None)
    blob = json.dumps({"tokenizer": definition, "chat_template": getattr(tokenizer, "chat_template", None),
                       "eos_token_id": tokenizer.eos_token_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def file_digest(path: Path) -> str:
    """A digest of a file's first and last 64 KiB and its size: cheap at any size, and it changes
    when a file is truncated, extended or rewritten at either end."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with path.open("rb") as f:
        h.update(f.read(_ENDS))
        if size > _ENDS:
            f.seek(max(size - _ENDS, _ENDS))
            h.update(f.read())
    return h.hexdigest()


def is_token_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (or was meant to be) an arwkv token directory (not raw data: a saved
    dataset or a folder of files may well have a train/ folder too)."""
    p = Path(path)
    return p.is_dir() and any((p / name).exists() for name in (MANIFEST, PARTIAL_MARKER, f"train/{TOKENS}"))


# ----------------------------------------------------------------------------- reading


class TokenSplit:
    """One split (train or validation) of a token directory, read lazily: ``tokens(a, b)`` reads
    tokens [a, b) with one pread (nothing is mapped, so the process's memory does not grow with
    what it has read); ``offsets`` [D + 1] int64 is memory-mapped."""

    def __init__(self, directory: Path, info: dict, dtype: np.dtype) -> None:
        self.directory, self.dtype = directory, dtype
        self.documents: int = info["documents"]
        self.size: int = info["tokens"]  # tokens
        self.labelled: int = info.get("labelled_tokens", 0)
        self.offsets = np.memmap(directory / DOCUMENTS, dtype=np.int64, mode="r")  # [D + 1]
        self._tokens = os.open(directory / TOKENS, os.O_RDONLY)
        mask = directory / LOSS_MASK
        self._mask = os.open(mask, os.O_RDONLY) if mask.exists() else None
        # the descriptors close with the object, or with close(), whichever comes first
        self._closers = [weakref.finalize(self, os.close, fd)
                         for fd in (self._tokens, self._mask) if fd is not None]

    @property
    def has_loss_mask(self) -> bool:
        return self._mask is not None

    def _read(self, fd: int, dtype: np.dtype, start: int, stop: int) -> np.ndarray:
        count = max(stop - start, 0)
        data = os.pread(fd, count * dtype.itemsize, start * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise DataError(f"{self.directory}: short read at token {start} (was the file truncated?)")
        return np.frombuffer(data, dtype=dtype)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids [start, stop) of the split's stream (its documents one after another)."""
        return self._read(self._tokens, self.dtype, start, stop)

    def loss_mask(self, start: int, stop: int) -> np.ndarray:
        """Stage 3's loss mask (1: an assistant token) over [start, stop)."""
        if self._mask is None:
            raise DataError(f"{self.directory.parent}: holds no loss masks (made from no chat records)")
        return self._read(self._mask, np.dtype(np.uint8), start, stop)

    def document(self, d: int) -> np.ndarray:
        """Token ids of document d."""
        return self.tokens(int(self.offsets[d]), int(self.offsets[d + 1]))

    def lengths(self) -> np.ndarray:
        """int64 [D]: every document's length."""
        return np.diff(np.asarray(self.offsets))

    def iter_documents(self, block: int = 1 << 22) -> Iterator[np.ndarray]:
        """Every document's ids, in order, read in blocks of about ``block`` tokens."""
        d = 0
        while d < self.documents:
            start = int(self.offsets[d])
            end_doc = max(int(np.searchsorted(self.offsets, start + block, side="right")) - 1, d + 1)
            end_doc = min(end_doc, self.documents)
            stream = self.tokens(start, int(self.offsets[end_doc]))
            for k in range(d, end_doc):
                yield stream[int(self.offsets[k]) - start:int(self.offsets[k + 1]) - start]
            d = end_doc

    def close(self) -> None:
        for closer in self._closers:
            closer()  # (a finalizer runs once)


@dataclass
class TokenSet:
    """A token directory, opened and checked: its manifest and its two splits."""

    path: Path
    manifest: dict
    train: TokenSplit
    validation: TokenSplit
    keep_alive: object = None  # a temporary directory this set lives in (raw --data), removed with it

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def counts(self) -> dict[str, int]:
        """Records of each kind: text, chat, preference."""
        return self.manifest["records"]

    @property
    def validation_fraction(self) -> float:
        return self.manifest["validation_fraction"]

    @property
    def seed(self) -> int:
        return self.manifest["seed"]

    def iter_documents(self, split: str = "all") -> Iterator[np.ndarray]:
        """The documents of one split, or of both (train, then validation) for "all"."""
        for name in SPLITS if split == "all" else (split,):
            yield from getattr(self, name).iter_documents()

    def check_tokenizer(self, tokenizer, whose: str) -> None:
        """Refuses (one line, both fingerprints) a tokenizer other than the one the set was made with."""
        theirs = tokenizer_fingerprint(tokenizer)
        if theirs != self.fingerprint:
            raise DataError(f"--data {self.path} was tokenized with tokenizer {self.fingerprint}, but "
                            f"{whose}'s tokenizer is {theirs}; run arwkv tokenize again with that tokenizer")

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def open_tokens(path: str | os.PathLike, flag: str = "--data") -> TokenSet:
    """Opens a token directory after checking it against its manifest: the format, every file's
    size and end digest, the index's ends. Each refusal is one line naming the directory."""
    p = Path(path)
    manifest_path = p / MANIFEST
    if not manifest_path.exists():
        if (p / PARTIAL_MARKER).exists() or (p / "train").exists():
            raise DataError(f"{flag} {p} is a token directory whose writing did not finish (no {MANIFEST}); "
                            "run arwkv tokenize again")
        raise DataError(f"{flag} {p} is not a token directory (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{flag} {p}: {MANIFEST} is not readable JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{flag} {p}: {MANIFEST} is not an arwkv token manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{flag} {p}: token format version {manifest.get('version')}; this arwkv reads "
                        f"version {VERSION}: run arwkv tokenize again")
    if (p / PARTIAL_MARKER).exists():
        raise DataError(f"{flag} {p} is a token directory whose writing did not finish; run arwkv tokenize "
                        "again")
    dtype = np.dtype(manifest["token_dtype"])
    for name, expected in manifest["files"].items():
        f = p / name
        if not f.is_file():
            raise DataError(f"{flag} {p}: {name} is missing")
        size = f.stat().st_size
        if size != expected["bytes"]:
            raise DataError(f"{flag} {p}: {name} has {size} bytes, its manifest says {expected['bytes']} "
                            "(truncated or altered); run arwkv tokenize again")
        if file_digest(f) != expected["digest"]:
            raise DataError(f"{flag} {p}: {name} is not the file its manifest describes (altered); "
                            "run arwkv tokenize again")
    splits = {name: TokenSplit(p / name, manifest["splits"][name], dtype) for name in SPLITS}
    for name, split in splits.items():
        if split.documents and (int(split.offsets[0]) != 0 or int(split.offsets[-1]) != split.size):
            raise DataError(f"{flag} {p}: {name}/{DOCUMENTS} does not index {name}/{TOKENS}")
    return TokenSet(p, manifest, splits["train"], splits["validation"])


# ----------------------------------------------------------------------------- writing


class SplitWriter:
    """Appends documents to one split's files (used by arwkv tokenize, inside a directory that is
    renamed into place only when complete)."""

    def __init__(self, directory: Path, dtype: np.dtype) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.dtype = directory, dtype
        self.tokens = (directory / TOKENS).open("wb")
        self.documents = (directory / DOCUMENTS).open("wb")
        self.mask = None  # opened by the first loss mask (chat data only)
        self.size = self.count = self.labelled = 0
        np.zeros(1, dtype=np.int64).tofile(self.documents)

    def append(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None) -> None:
        """Documents of ``lengths`` whose tokens are ``tokens`` (one after another), with their
        loss mask when they have one."""
        if not len(lengths):
            return
        if mask is not None:
            self.open_mask()
        tokens.astype(self.dtype, copy=False).tofile(self.tokens)
        (self.size + np.cumsum(lengths, dtype=np.int64)).tofile(self.documents)
        if self.mask is not None:
            (mask if mask is not None else np.zeros(len(tokens), np.uint8)).tofile(self.mask)
            self.labelled += int(mask.sum()) if mask is not None else 0
        self.size += len(tokens)
        self.count += len(lengths)

    def open_mask(self) -> None:
        """Starts the loss-mask file (zeros for the tokens written so far), if not yet started."""
        if self.mask is None:
            self.mask = (self.directory / LOSS_MASK).open("wb")
            for start in range(0, self.size, 1 << 24):
                np.zeros(min(1 << 24, self.size - start), np.uint8).tofile(self.mask)

    def close(self) -> dict:
        """Flushes the files; the split's entry of the manifest."""
        for f in (self.tokens, self.documents, self.mask):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        return {"documents": self.count, "tokens": self.size, "labelled_tokens": self.labelled}


def write_manifest(directory: Path, manifest: dict) -> None:
    """Completes ``manifest`` with every file's size and digest and writes it (the last file)."""
    files = {}
    for f in sorted(directory.rglob("*.bin")):
        files[f.relative_to(directory).as_posix()] = {"bytes": f.stat().st_size, "digest": file_digest(f)}
    manifest = {"format": FORMAT, "version": VERSION, **manifest, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
