"""Training data: documents from files or saved datasets -> token ids -> fixed-length rows whose
document boundaries travel as ``cu_seqlens``, so the recurrent state (and the token shift)
restarts at every document.

Accepted: a .txt file (one document), a .jsonl or .parquet file (one record per line/row), a
directory of such files (sorted, recursively), or a dataset saved with ``datasets``
(``save_to_disk``). Records are ``{"text": ...}`` or ``{"messages"|"conversations": [{role|from,
content|value}, ...]}``; the latter are rendered with the tokenizer's chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

Tensor = torch.Tensor
T = TypeVar("T")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
# ShareGPT-style speaker names -> chat-template roles
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "tool": "tool"}


class DataError(ValueError):
    """Unreadable or malformed training data; the message names the file (and line)."""


def iter_records(path: str | Path) -> Iterator[dict]:
    """Every record under ``path``, in a fixed order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if p.is_dir():
        if any((p / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
            yield from _saved_dataset(p)
            return
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FILE_SUFFIXES)
        if not files:
            raise DataError(f"data directory {p} holds no {', '.join(FILE_SUFFIXES)} files")
        for f in files:
            yield from _file_records(f)
    else:
        yield from _file_records(p)


def _saved_dataset(p: Path) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as err:  # noqa: BLE001 - reported in one line
        raise DataError(f"data directory {p} is not a readable saved dataset: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"saved dataset {p} has splits {list(ds)} but no 'train'")
        ds = ds["train"]
    yield from ds


def _file_records(f: Path) -> Iterator[dict]:
    if f.suffix == ".txt":
        yield {"text": f.read_text(encoding="utf-8")}
    elif f.suffix == ".jsonl":
        with f.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    why = err.msg.removesuffix(" at")  # json's "Invalid control character at"
                    raise DataError(f"{f}:{number}: not valid JSON at column {err.colno}: "
                                    f"{why[:1].lower()}{why[1:]}") from err
                if not isinstance(record, dict):
                    raise DataError(f"{f}:{number}: a record must be a JSON object")
                yield record
    elif f.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(f)
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{f}: not a readable parquet file: {err}") from err
        yield from table.to_pylist()
    else:
        raise DataError(f"{f}: unsupported data file (expected one of {', '.join(FILE_SUFFIXES)})")


def per_record(make: Callable[[dict], T], records: Iterable[dict], source: str | Path) -> list[T]:
    """``make(record)`` for every record; a refusal names the data and the record's number
    (``data/x.jsonl: record 3: ...``), the chat template's own refusals included."""
    out = []
    for i, record in enumerate(records):
        try:
            out.append(make(record))
        except (DataError, ValueError, TypeError, KeyError, AttributeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"{source}: record {i + 1}: {first}") from None
    return out


def chat_messages(record: dict) -> list[dict]:
    """A record's messages as chat-template input: [{"role", "content"}] (ShareGPT's from/value
    and human/gpt accepted)."""
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    messages = record.get("messages", record.get("conversations"))
    if not isinstance(messages, list):
        raise DataError(f"a chat record needs a 'messages' (or 'conversations') list; it has keys "
                        f"{sorted(record)}")
    if not messages:
        raise DataError("its 'messages' list is empty")
    chat = []
    for m in messages:
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"a message needs a known role/from ({', '.join(ROLES)}) and string content: {m}")
        chat.append({"role": ROLES[role], "content": content})
    return chat


def record_text(record: dict, tokenizer) -> str:
    """The text of a record: its "text", or its messages rendered with the chat template."""
    if isinstance(record, dict) and not {"text", "messages", "conversations"} & set(record):
        raise DataError(f"a record needs 'text' or a 'messages'/'conversations' list; it has keys "
                        f"{sorted(record)}")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError("a record's 'text' must be a string")
        return record["text"]
    chat = chat_messages(record)
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat records need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(chat, tokenize=False)


def tokenize_documents(records: Iterable[dict], tokenizer, append_eos: bool = True,
                       source: str | Path = "data") -> list[list[int]]:
    """Token ids per document (the tokenizer's EOS appended, so documents end visibly); a bad
    record is refused naming ``source`` and its number."""
    eos = tokenizer.eos_token_id if append_eos else None

    def ids_of(record: dict) -> list[int]:
        ids = tokenizer(record_text(record, tokenizer), add_special_tokens=False)["input_ids"]
        return ids + [eos] if eos is not None else ids

    return [ids for ids in per_record(ids_of, records, source) if ids]


def scored_documents(data: str | Path, tokenizer, validation_fraction: float = 0.0,
                     seed: int = 0) -> list[list[int]]:
    """Token ids per document of ``data``, or of its validation split when validation_fraction
    > 0 (the split arwkv distill makes with that fraction and seed): what evaluations score."""
    docs = tokenize_documents(iter_records(data), tokenizer, source=data)
    return split_documents(docs, validation_fraction, seed)[1] if validation_fraction else docs


def split_documents(docs: Sequence[T], validation_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A deterministic split by whole documents (train, validation); documents may be token
    lists or anything else (SFT examples), in their order."""
    if not 0 <= validation_fraction < 1:
        raise DataError(f"validation fraction {validation_fraction} is not in [0, 1)")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(len(docs) * validation_fraction)
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


@dataclass
class PackedRow:
    """One training row: seq_len token ids, where its documents start, and (SFT) its labels."""

    input_ids: Tensor            # [seq_len] int64
    cu_seqlens: Tensor           # [k + 1] int32: 0 = c_0 < ... < c_k = seq_len
    labels: Tensor | None = None  # [seq_len] int64, -100 where no loss is taken


def pack_documents(docs: Sequence[list[int]], seq_len: int, seed: int,
                   labels: Sequence[list[int]] | None = None) -> list[PackedRow]:
    """Shuffles the documents (seeded), concatenates them and cuts the stream into rows of seq_len
    tokens (the last, shorter piece is dropped). A document cut by a row end continues at the
    start of the next row, where the state restarts anyway. ``labels`` (one list per document,
    aligned with it) are packed the same way."""
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, ids, lab, starts = [], [], [], [0]
    for i in order:
        doc, doc_labels = docs[i], labels[i] if labels is not None else None
        pos = 0
        while pos < len(doc):
            take = min(len(doc) - pos, seq_len - len(ids))
            ids.extend(doc[pos:pos + take])
            if doc_labels is not None:
                lab.extend(doc_labels[pos:pos + take])
            pos += take
            if len(ids) == seq_len:
                rows.append(PackedRow(torch.tensor(ids, dtype=torch.long),
                                      torch.tensor(starts + [seq_len], dtype=torch.int32),
                                      torch.tensor(lab, dtype=torch.long) if labels is not None else None))
                ids, lab, starts = [], [], [0]
        if ids and starts[-1] != len(ids):
            starts.append(len(ids))  # the next document starts here
    return rows


@dataclass
class ConversationPacking:
    """What pack_conversations did: conversations packed whole, cut to seq_len or left out, and
    the padding it added."""

    conversations: int = 0
    truncated: int = 0
    skipped: int = 0
    rows: int = 0
    padding: int = 0  # tokens

    def describe(self, seq_len: int, overlong: str) -> str:
        """One line for the run's log."""
        cut = self.truncated if overlong == "truncate" else self.skipped
        verb = "truncated to" if overlong == "truncate" else "skipped, longer than"
        total = max(self.rows * seq_len, 1)
        return (f"{self.conversations} conversations packed whole into {self.rows} rows "
                f"({100 * self.padding / total:.1f}% padding); {cut} {verb} --seq-len {seq_len}")


def pack_conversations(
    examples: Sequence[tuple[list[int], list[int]]], seq_len: int, seed: int, overlong: str = "truncate",
    pad_id: int = 0,
) -> tuple[list[PackedRow], ConversationPacking]:
    """Packs chat examples (input_ids, labels) into rows of seq_len tokens without cutting one
    across rows: the state restarts at each row, so the second part of a cut answer would be
    trained without its prompt. In a seeded order, each row takes whole conversations while they
    fit; the rest of the row is padding (one more document whose labels are all -100). A
    conversation longer than seq_len is truncated to its first seq_len tokens
    (``overlong="truncate"``) or left out (``"skip"``); both are counted in the report."""
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    if overlong not in ("truncate", "skip"):
        raise DataError(f"overlong must be 'truncate' or 'skip', got {overlong!r}")
    report = ConversationPacking()
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[PackedRow] = []
    ids: list[int] = []
    lab: list[int] = []
    starts: list[int] = []

    def close_row() -> None:
        pad = seq_len - len(ids)
        bounds = starts + ([len(ids)] if pad else []) + [seq_len]
        rows.append(PackedRow(torch.tensor(ids + [pad_id] * pad, dtype=torch.long),
                              torch.tensor(bounds, dtype=torch.int32),
                              torch.tensor(lab + [-100] * pad, dtype=torch.long)))
        report.padding += pad
        ids.clear()
        lab.clear()
        starts.clear()

    for i in order:
        doc, doc_labels = examples[i]
        if not doc:
            continue
        if len(doc) > seq_len:
            if overlong == "skip":
                report.skipped += 1
                continue
            report.truncated += 1
            doc, doc_labels = doc[:seq_len], doc_labels[:seq_len]
        if len(ids) + len(doc) > seq_len:
            close_row()
        starts.append(len(ids))
        ids.extend(doc)
        lab.extend(doc_labels)
        report.conversations += 1
    if ids:
        close_row()
    report.rows = len(rows)
    return rows, report


def label_tokens(rows: Sequence[PackedRow]) -> int:
    """How many tokens of ``rows`` carry a label a loss is taken on (SFT: the assistant tokens;
    a document's first token never has one, as collate makes it)."""
    total = 0
    for row in rows:
        if row.labels is None:
            total += row.input_ids.numel() - (row.cu_seqlens.numel() - 1)
        else:
            labelled = row.labels != -100
            labelled[row.cu_seqlens[:-1].long()] = False
            total += int(labelled.sum())
    return total


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


def sft_example(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    """A chat record -> (input_ids, labels) for supervised fine-tuning: labels equal input_ids on
    the assistant messages' tokens (and the EOS that closes the conversation) and -100 elsewhere.
    Labels are aligned with input_ids, not shifted: the model shifts them, once.

    Assistant spans are found by rendering the conversation up to each message with the chat
    template, so any template works; tokens are mapped to characters with the fast tokenizer's
    offsets.
    """
    chat = chat_messages(record)
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    spans = []
    for i, m in enumerate(chat):
        if m["role"] != "assistant":
            continue
        before = ""
        if i:
            before = tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(chat[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "assistant spans cannot be located")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(a <= start < b for a, b in spans) else -100
              for t, (start, _) in zip(ids, enc["offset_mapping"], strict=True)]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if spans and spans[-1][1] >= len(text.rstrip()) else -100)
    return ids, labels


# ----------------------------------------------------------------------------- preference pairs


def preference_pair(record: dict, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """A preference record -> token ids of (prompt, chosen answer, rejected answer); each answer
    ends with the tokenizer's EOS. ``prompt`` is a string, or a list of messages rendered with
    the chat template (with the assistant turn opened); ``chosen`` / ``rejected`` are strings."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise DataError(f"a preference record needs 'prompt', 'chosen' and 'rejected'; missing {missing}")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("a prompt given as messages needs a tokenizer with a chat template")
        prompt = tokenizer.apply_chat_template(chat_messages({"messages": prompt}), tokenize=False,
                                               add_generation_prompt=True)
    if not all(isinstance(x, str) for x in (prompt, record["chosen"], record["rejected"])):
        raise DataError("a preference record's prompt (or messages), chosen and rejected must be strings")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode(prompt), encode(record["chosen"]) + eos, encode(record["rejected"]) + eos


@dataclass
class PreferencePacking:
    """What pack_preferences did with the pairs."""

    pairs: int = 0
    truncated: int = 0
    skipped: int = 0

    def describe(self, seq_len: int, overlong: str) -> str:
        cut = self.truncated if overlong == "truncate" else self.skipped
        verb = "had an answer cut to fit" if overlong == "truncate" else "skipped, too long for"
        return (f"{self.pairs} preference pairs, one per row (chosen and rejected, each up to "
                f"{seq_len // 2} tokens); {cut} {verb} --seq-len {seq_len}")


def pack_preferences(
    pairs: Sequence[tuple[list[int], list[int], list[int]]], seq_len: int, overlong: str = "truncate",
    pad_id: int = 0,
) -> tuple[list[PackedRow], PreferencePacking]:
    """One row per pair: prompt + chosen as the row's first sequence, prompt + rejected as its
    second (each at most seq_len // 2 tokens), padding after them; labels on the answers' tokens
    only. A sequence longer than its half is cut at the end (``overlong="truncate"``; a pair whose
    answer would be cut away entirely is left out) or the pair is left out (``"skip"``)."""
    if seq_len < 4:
        raise DataError(f"seq_len must be at least 4 for preference pairs, got {seq_len}")
    if overlong not in ("truncate", "skip"):
        raise DataError(f"overlong must be 'truncate' or 'skip', got {overlong!r}")
    half, report, rows = seq_len // 2, PreferencePacking(), []
    for prompt, chosen, rejected in pairs:
        seqs = [(prompt + answer, [-100] * len(prompt) + answer) for answer in (chosen, rejected)]
        if any(len(ids) > half for ids, _ in seqs):
            if overlong == "skip" or len(prompt) >= half:
                report.skipped += 1
                continue
            report.truncated += 1
            seqs = [(ids[:half], lab[:half]) for ids, lab in seqs]
        ids = seqs[0][0] + seqs[1][0]
        labels = seqs[0][1] + seqs[1][1]
        pad = seq_len - len(ids)
        bounds = [0, len(seqs[0][0]), len(ids)] + ([seq_len] if pad else [])
        rows.append(PackedRow(torch.tensor(ids + [pad_id] * pad, dtype=torch.long),
                              torch.tensor(bounds, dtype=torch.int32),
                              torch.tensor(labels + [-100] * pad, dtype=torch.long)))
        report.pairs += 1
    return rows, report
