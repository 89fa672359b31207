"""Records: what ``--data`` holds, read one record at a time, and each record's tokens.

Accepted: a .txt file (one document), a .jsonl or .parquet file (one record per line/row), a
directory of such files (sorted, recursively), or a dataset saved with ``datasets``
(``save_to_disk``). A record is ``{"text": ...}``; or ``{"messages"|"conversations": [{role|from,
content|value}, ...]}``, a chat rendered with the tokenizer's chat template; or ``{"prompt",
"chosen", "rejected"}``, a preference pair (stage 4). Nothing here holds more than one record (a
parquet file is read 1,024 rows at a time), so a corpus of any size streams through.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
# ShareGPT-style speaker names -> chat-template roles
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "tool": "tool"}
# what a record is, from its keys: a document (plain text or a chat) or a preference pair
KINDS = ("text", "chat", "preference")


class DataError(ValueError):
    """Unreadable or malformed training data; the message names the file (and line)."""


class UnlocatedAnswers(DataError):
    """A chat template that does not render a conversation prefix by prefix: its assistant
    answers cannot be located (no SFT labels), though the conversation is a fine document."""


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and any((p / marker).exists() for marker in SAVED_DATASET_MARKERS)


def data_files(path: str | Path) -> list[Path]:
    """The files ``path`` reads, in reading order (a saved dataset: all its files)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if not p.is_dir():
        return [p]
    if _is_saved_dataset(p):
        return sorted(f for f in p.rglob("*") if f.is_file())
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FILE_SUFFIXES)
    if not files:
        raise DataError(f"data directory {p} holds no {', '.join(FILE_SUFFIXES)} files")
    return files


def iter_records(path: str | Path) -> Iterator[dict]:
    """Every record under ``path``, in a fixed order."""
    p = Path(path)
    if _is_saved_dataset(p):
        yield from _open_saved_dataset(p)
        return
    for f in data_files(p):
        yield from _file_records(f)


def count_records(path: str | Path) -> int:
    """How many records iter_records(path) yields, without parsing them (a quick pass: jsonl
    lines that are not blank, parquet row counts, a saved dataset's length)."""
    p = Path(path)
    if _is_saved_dataset(p):
        return len(_open_saved_dataset(p))
    total = 0
    for f in data_files(p):
        if f.suffix == ".txt":
            total += 1
        elif f.suffix == ".jsonl":  # (read as _file_records reads it: the same lines count)
            with f.open(encoding="utf-8", errors="replace") as lines:
                total += sum(1 for line in lines if line.strip())
        elif f.suffix == ".parquet":
            total += _parquet(f).metadata.num_rows
        else:
            raise DataError(f"{f}: unsupported data file (expected one of {', '.join(FILE_SUFFIXES)})")
    return total


def _open_saved_dataset(p: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as err:  # noqa: BLE001 - reported in one line
        raise DataError(f"data directory {p} is not a readable saved dataset: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"saved dataset {p} has splits {list(ds)} but no 'train'")
        ds = ds["train"]
    return ds


def _parquet(f: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{f}: not a readable parquet file: {err}") from err


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
        for batch in _parquet(f).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        raise DataError(f"{f}: unsupported data file (expected one of {', '.join(FILE_SUFFIXES)})")


def record_kind(record: dict) -> str:
    """"text", "chat" or "preference", from the record's keys."""
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    if "text" in record:
        return "text"
    if "messages" in record or "conversations" in record:
        return "chat"
    if {"prompt", "chosen", "rejected"} & set(record):
        return "preference"
    raise DataError(f"a record needs 'text', a 'messages'/'conversations' list, or 'prompt'/'chosen'/"
                    f"'rejected'; it has keys {sorted(record)}")


def one_line(err: BaseException) -> str:
    """An exception's first line (a chat template's own refusals run over several)."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# the errors a record's contents (or a chat template given them) can raise
RECORD_ERRORS = (DataError, ValueError, TypeError, KeyError, AttributeError)


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
            raise UnlocatedAnswers("the chat template does not render conversations prefix by prefix; "
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
