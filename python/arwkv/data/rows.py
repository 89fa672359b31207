"""Training rows, cut lazily from a token split: row r is read only when a step asks for it, so
what a run holds in memory does not grow with the corpus.

A row is ``seq_len`` token ids with ``cu_seqlens``, where its documents start: the recurrent state
(and the token shift) restarts at each one. Three ways of making rows, one per kind of data:

- :class:`DocumentRows` (stages 1-2, evaluations): the split's documents one after another, cut
  every seq_len tokens; a document cut by a row's end continues at the next row's start (where
  the state restarts anyway); the last, shorter piece is dropped.
- :class:`ConversationRows` (stage 3): whole conversations, as many as fit, then padding: the
  second part of a cut answer would be trained without its prompt. One longer than seq_len is cut
  to its first seq_len tokens or left out (``overlong``).
- :class:`PreferenceRows` (stage 4): one preference pair a row, prompt + chosen answer then
  prompt + rejected answer, each at most seq_len // 2 tokens.

Rows hold documents in the order they were tokenized; :class:`RowOrder` visits the rows in a
seeded order, a new one each epoch, computed per row from (seed, epoch, position) by
:func:`permute` (never materialised), so any step's rows are known from the step number alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .records import DataError
from .shards import TokenSplit

Tensor = torch.Tensor
OVERLONG = ("truncate", "skip")


@dataclass
class PackedRow:
    """One training row: seq_len token ids, where its documents start, and (SFT, DPO) its labels."""

    input_ids: Tensor            # [seq_len] int64
    cu_seqlens: Tensor           # [k + 1] int32: 0 = c_0 < ... < c_k = seq_len
    labels: Tensor | None = None  # [seq_len] int64, -100 where no loss is taken


def _row(ids: np.ndarray, bounds: Sequence[int], labels: np.ndarray | None = None) -> PackedRow:
    return PackedRow(torch.from_numpy(ids.astype(np.int64)), torch.tensor(bounds, dtype=torch.int32),
                     torch.from_numpy(labels.astype(np.int64)) if labels is not None else None)


# ----------------------------------------------------------------------------- rows


class DocumentRows:
    """Rows of seq_len tokens cut from a split's stream of documents (stages 1-2)."""

    def __init__(self, split: TokenSplit, seq_len: int) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.split, self.seq_len = split, seq_len
        self.packing_note = ""

    def __len__(self) -> int:
        return self.split.size // self.seq_len

    def __getitem__(self, r: int) -> PackedRow:
        if not 0 <= r < len(self):
            raise IndexError(r)
        S, offsets = self.seq_len, self.split.offsets
        start = r * S
        # documents that start strictly inside the row (a start at its first token is its 0)
        lo, hi = np.searchsorted(offsets, [start, start + S], side="right")
        inner = np.unique(np.asarray(offsets[lo:hi]) - start)
        inner = inner[(inner > 0) & (inner < S)]
        return _row(self.split.tokens(start, start + S), [0, *inner.tolist(), S])


@dataclass
class Packing:
    """What a packer kept, cut or left out, and the padding it added: the run's log says it."""

    kept: int = 0
    truncated: int = 0
    skipped: int = 0
    rows: int = 0
    padding: int = 0  # tokens


class ConversationRows:
    """Rows of whole conversations, padded (stage 3), labelled on the assistant tokens only: the
    conversations are taken in order, and a row closes when the next one does not fit."""

    def __init__(self, split: TokenSplit, seq_len: int, overlong: str = "truncate", pad_id: int = 0) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        if overlong not in OVERLONG:
            raise DataError(f"overlong must be 'truncate' or 'skip', got {overlong!r}")
        if split.documents and not split.has_loss_mask:
            raise DataError("these documents have no loss masks (they came from no chat records)")
        self.split, self.seq_len, self.overlong, self.pad_id = split, seq_len, overlong, pad_id
        lengths = split.lengths()
        too_long = lengths > seq_len
        self.keep = (lengths > 0) & ~(too_long & (overlong == "skip"))
        taken = np.minimum(lengths, seq_len)
        kept = np.flatnonzero(self.keep)
        first: list[int] = []  # the conversation each row starts with
        fill = seq_len
        for i, n in zip(kept.tolist(), taken[kept].tolist(), strict=True):
            if fill + n > seq_len:
                first.append(i)
                fill = 0
            fill += n
        self.first = np.array([*first, split.documents], dtype=np.int64)  # [R + 1]
        self.report = Packing(
            kept=len(kept),
            truncated=int((too_long & self.keep).sum()),
            skipped=int((too_long & ~self.keep).sum()),
            rows=len(first),
            padding=len(first) * seq_len - int(taken[kept].sum()),
        )

    def __len__(self) -> int:
        return len(self.first) - 1

    def describe(self) -> str:
        """One line for the run's log."""
        p, S = self.report, self.seq_len
        cut, verb = ((p.truncated, "truncated to") if self.overlong == "truncate"
                     else (p.skipped, "skipped, longer than"))
        return (f"{p.kept} conversations packed whole into {p.rows} rows "
                f"({100 * p.padding / max(p.rows * S, 1):.1f}% padding); {cut} {verb} --seq-len {S}")

    def __getitem__(self, r: int) -> PackedRow:
        if not 0 <= r < len(self):
            raise IndexError(r)
        S, offsets = self.seq_len, self.split.offsets
        a, b = int(self.first[r]), int(self.first[r + 1])
        ids, labels, starts = [], [], []
        for c in (np.flatnonzero(self.keep[a:b]) + a).tolist():  # each kept one, at most S of its tokens
            lo = int(offsets[c])
            hi = min(int(offsets[c + 1]), lo + S)
            tokens, mask = self.split.tokens(lo, hi), self.split.loss_mask(lo, hi)
            starts.append(sum(map(len, ids)))
            ids.append(tokens)
            labels.append(np.where(mask == 1, tokens.astype(np.int64), -100))
        used = starts[-1] + len(ids[-1])
        pad = S - used
        ids.append(np.full(pad, self.pad_id, dtype=np.int64))
        labels.append(np.full(pad, -100, dtype=np.int64))
        bounds = starts + ([used] if pad else []) + [S]
        return _row(np.concatenate([i.astype(np.int64) for i in ids]), bounds, np.concatenate(labels))


class PreferenceRows:
    """One preference pair a row (stage 4): prompt + chosen, then prompt + rejected, each at most
    seq_len // 2 tokens, then padding; labels on the answers' tokens only. A sequence longer than
    its half is cut at its end (``overlong="truncate"``; a pair whose prompt alone fills the half is
    left out) or the pair is left out (``"skip"``)."""

    def __init__(self, split: TokenSplit, seq_len: int, overlong: str = "truncate", pad_id: int = 0) -> None:
        if seq_len < 4:
            raise DataError(f"seq_len must be at least 4 for preference pairs, got {seq_len}")
        if overlong not in OVERLONG:
            raise DataError(f"overlong must be 'truncate' or 'skip', got {overlong!r}")
        if split.documents % 3:
            raise DataError("these documents are not preference pairs (prompt, chosen, rejected)")
        self.split, self.seq_len, self.overlong, self.pad_id = split, seq_len, overlong, pad_id
        self.half = seq_len // 2
        lengths = split.lengths().reshape(-1, 3)  # [P, 3]: prompt, chosen, rejected
        too_long = ((lengths[:, :1] + lengths[:, 1:]) > self.half).any(axis=1)
        drop = too_long & ((overlong == "skip") | (lengths[:, 0] >= self.half))
        self.pairs = np.flatnonzero(~drop)  # [R]
        self.report = Packing(kept=len(self.pairs), truncated=int((too_long & ~drop).sum()),
                              skipped=int(drop.sum()), rows=len(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self) -> str:
        p = self.report
        cut, verb = ((p.truncated, "had an answer cut to fit") if self.overlong == "truncate"
                     else (p.skipped, "skipped, too long for"))
        return (f"{p.kept} preference pairs, one per row (chosen and rejected, each up to "
                f"{self.half} tokens); {cut} {verb} --seq-len {self.seq_len}")

    def __getitem__(self, r: int) -> PackedRow:
        if not 0 <= r < len(self):
            raise IndexError(r)
        p = int(self.pairs[r])
        prompt, chosen, rejected = (self.split.document(3 * p + k).astype(np.int64) for k in range(3))
        no_labels = np.full(len(prompt), -100)
        seqs = [(np.concatenate([prompt, answer])[: self.half],
                 np.concatenate([no_labels, answer])[: self.half]) for answer in (chosen, rejected)]
        used = len(seqs[0][0]) + len(seqs[1][0])
        pad = self.seq_len - used
        ids = np.concatenate([seqs[0][0], seqs[1][0], np.full(pad, self.pad_id)])
        labels = np.concatenate([seqs[0][1], seqs[1][1], np.full(pad, -100)])
        bounds = [0, len(seqs[0][0]), used] + ([self.seq_len] if pad else [])
        return _row(ids, bounds, labels)


def collate(rows: Sequence[PackedRow]) -> dict[str, Tensor]:
    """Rows -> one batch: input_ids [B, T]; cu_seqlens over all B * T tokens (the WKV ops take
    packed sequences: the student runs on input_ids.view(1, B * T)); position_ids [B, T] that
    restart at every document (a Transformer teacher given them and no attention mask keeps its
    attention inside documents); labels [B, T] for next-token losses: the row's SFT labels, or
    the tokens themselves, with -100 at each document's first token (nothing before it in the
    same document predicts it)."""
    seq_len = rows[0].input_ids.numel()
    cu, positions = [torch.tensor([0], dtype=torch.int32)], []
    for k, row in enumerate(rows):
        cu.append(row.cu_seqlens[1:] + k * seq_len)
        lengths = (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).long()
        starts = torch.repeat_interleave(row.cu_seqlens[:-1].long(), lengths)
        positions.append(torch.arange(seq_len) - starts)
    input_ids = torch.stack([r.input_ids for r in rows])
    labels = torch.stack([r.labels if r.labels is not None else r.input_ids for r in rows]).clone()
    position_ids = torch.stack(positions)
    labels[position_ids == 0] = -100
    return {"input_ids": input_ids, "cu_seqlens": torch.cat(cu), "position_ids": position_ids,
            "labels": labels}
