"""Training data: reading every accepted format, chat rendering, packing into rows with
document boundaries, deterministic order and splits, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from arwkv.data import (
    DataError,
    collate,
    iter_records,
    pack_conversations,
    pack_documents,
    record_text,
    split_documents,
    tokenize_documents,
)
from fixtures import tiny_teacher, vocabulary, word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(vocabulary(50))


def test_every_format_and_a_directory_of_them(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("w1 w2 w3")
    (d / "b.jsonl").write_text(json.dumps({"text": "w4"}) + "\n\n" + json.dumps({"text": "w5 w6"}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"text": "w7"}, {"text": "w8 w9"}]), d / "sub" / "c.parquet")
    (d / "ignored.md").write_text("not data")
    assert [r["text"] for r in iter_records(d)] == ["w1 w2 w3", "w4", "w5 w6", "w7", "w8 w9"]
    saved = tmp_path / "saved"
    train = datasets.Dataset.from_list([{"text": "w10"}, {"text": "w11"}])
    datasets.DatasetDict({"train": train}).save_to_disk(saved)
    assert [r["text"] for r in iter_records(saved)] == ["w10", "w11"]
    single = tmp_path / "single"
    datasets.Dataset.from_list([{"text": "w12"}]).save_to_disk(single)
    assert [r["text"] for r in iter_records(single)] == ["w12"]


def test_chat_records_render_with_the_template(tokenizer):
    messages = {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "w1 w2"}, {"from": "gpt", "value": "w3"}]}
    rendered = "<user> w1 w2 <assistant> w3 "
    assert record_text(messages, tokenizer) == record_text(sharegpt, tokenizer) == rendered
    docs = tokenize_documents(iter([messages, {"text": "w9"}]), tokenizer)
    assert docs == [[2, 6, 7, 3, 8, 0], [14, 0]]  # EOS (id 0) closes each document


def test_packing_keeps_the_stream_and_marks_document_starts():
    docs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate([3, 7, 1, 12, 5, 4, 9])]
    rows = pack_documents(docs, seq_len=8, seed=3)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(3)).tolist()
    stream = [t for i in order for t in docs[i]]
    assert len(rows) == len(stream) // 8
    assert torch.equal(torch.cat([r.input_ids for r in rows]), torch.tensor(stream[: 8 * len(rows)]))
    for row in rows:
        cu = row.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == 8 and all(a < b for a, b in zip(cu, cu[1:], strict=False))
        # every interior boundary is where a document's first token sits
        firsts = {docs[i][0] for i in order}
        for c in cu[1:-1]:
            assert row.input_ids[c].item() in firsts
        for c in range(1, 8):
            if c not in cu:
                assert row.input_ids[c].item() not in firsts
    def ids(rs):
        return [r.input_ids.tolist() for r in rs]

    assert ids(pack_documents(docs, 8, seed=3)) == ids(rows)
    assert ids(pack_documents(docs, 8, seed=4)) != ids(rows)


def test_collate_packs_rows_for_the_op():
    rows = pack_documents([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12]], seq_len=4, seed=0)
    batch = collate(rows)
    B = len(rows)
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["labels"].shape == (B, 4)
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 4 * B and cu == sorted(set(cu))
    assert all(k * 4 in cu for k in range(B + 1))  # every row starts a sequence
    flat_pos, flat_lab = batch["position_ids"].flatten().tolist(), batch["labels"].flatten().tolist()
    flat_ids = batch["input_ids"].flatten().tolist()
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        assert flat_pos[a:b] == list(range(b - a))  # positions restart at every document
        assert flat_lab[a] == -100 and flat_lab[a + 1:b] == flat_ids[a + 1:b]


def test_packed_sft_labels_travel_with_their_tokens():
    docs, labels = [[1, 2, 3], [4, 5, 6, 7, 8]], [[-100, 2, 3], [-100, -100, 6, 7, -100]]
    rows = pack_documents(docs, seq_len=4, seed=0, labels=labels)
    label_of = {t: lab for d, ls in zip(docs, labels, strict=True) for t, lab in zip(d, ls, strict=True)}
    for row in rows:
        for t, lab in zip(row.input_ids.tolist(), row.labels.tolist(), strict=True):
            assert lab == label_of[t]


def test_teacher_attention_stays_inside_packed_documents():
    """A transformers teacher given collate's position_ids (no attention mask, no cache) sees each
    document alone: the same logits as running the documents one by one."""
    teacher = tiny_teacher().eval()
    docs = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16]]
    batch = collate(pack_documents(docs, seq_len=6, seed=1))
    with torch.no_grad():
        packed = teacher(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        cu = batch["cu_seqlens"].tolist()
        flat_ids, flat_logits = batch["input_ids"].flatten(), packed.flatten(0, 1)
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            alone = teacher(flat_ids[a:b][None]).logits[0]
            torch.testing.assert_close(flat_logits[a:b], alone, rtol=1e-5, atol=1e-5)


def test_validation_split_is_deterministic_and_disjoint():
    docs = [[i] for i in range(40)]
    train, val = split_documents(docs, 0.25, seed=1)
    assert len(val) == 10 and len(train) == 30 and not {d[0] for d in train} & {d[0] for d in val}
    assert split_documents(docs, 0.25, seed=1) == (train, val)


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ('{"text": "w1"}\n{"text": \n', "b.jsonl:2: not valid JSON at column 1: expecting value"),
    ('{"text": "a\tb"}\n', "b.jsonl:1: not valid JSON at column 12: invalid control character"),
    ('["w1"]\n', "b.jsonl:1: a record must be a JSON object"),
    ('{"body": "w1"}\n', "needs 'text' or a 'messages'/'conversations' list"),
])
def test_bad_data_is_one_clear_error(tmp_path, tokenizer, content, message):
    path = tmp_path / "b.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", "\\(").replace("[", "\\[")):
        tokenize_documents(iter_records(path), tokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .txt, .jsonl, .parquet files"):
        list(iter_records(empty))


def test_sft_labels_cover_only_assistant_tokens(tokenizer):
    from arwkv.data import sft_example

    record = {"conversations": [{"from": "system", "value": "w1"}, {"from": "human", "value": "w2 w3"},
                                {"from": "gpt", "value": "w4 w5"}, {"from": "human", "value": "w6"},
                                {"from": "gpt", "value": "w7"}]}
    ids, labels = sft_example(record, tokenizer)
    text = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert text == ["<system>", "w1", "<user>", "w2", "w3", "<assistant>", "w4", "w5", "<user>", "w6",
                    "<assistant>", "w7", "<eos>"]
    labelled = [t for t, lab in zip(text, labels, strict=True) if lab != -100]
    assert labelled == ["w4", "w5", "w7", "<eos>"]
    assert all(lab in (-100, i) for lab, i in zip(labels, ids, strict=True))  # aligned, not shifted


def test_sft_loss_is_transformers_loss_on_the_same_batch(tokenizer):
    """The student's loss with these labels equals transformers' causal-LM loss on the same
    logits and labels: the labels are shifted exactly once."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from arwkv.conversion.convert import student_from_teacher
    from arwkv.data import sft_example

    student = student_from_teacher(tiny_teacher(), head_size=32)
    record = {"messages": [{"role": "user", "content": "w2 w3 w9"},
                           {"role": "assistant", "content": "w4 w5 w6"}]}
    ids, labels = sft_example(record, tokenizer)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    out = student(ids, labels=labels)
    reference = ForCausalLMLoss(out.logits, labels, vocab_size=out.logits.shape[-1])
    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=1e-6)
    shifted_twice = torch.nn.functional.cross_entropy(out.logits[0, :-2], labels[0, 2:], ignore_index=-100)
    assert not torch.isclose(out.loss, shifted_twice)


def conversations(lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    """Chat examples whose tokens name their conversation (1000 * c + position) and whose labels
    mark the second half as the answer."""
    out = []
    for c, n in enumerate(lengths):
        ids = [1000 * (c + 1) + t for t in range(n)]
        out.append((ids, [-100 if t < n // 2 else x for t, x in enumerate(ids)]))
    return out


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_conversations_are_packed_whole(overlong):
    """Stage 3's packing: every row is seq_len tokens; each conversation sits whole (or, when
    longer than a row, truncated or left out, as asked, and counted) in one document of one row,
    with its own labels; the rest of a row is padding without labels."""
    lengths = [3, 9, 5, 12, 1, 7, 8, 2, 30, 6]
    seq_len = 10
    rows, report = pack_conversations(conversations(lengths), seq_len, seed=1, overlong=overlong, pad_id=7)
    assert report.rows == len(rows) and all(r.input_ids.numel() == seq_len for r in rows)
    long = sum(n > seq_len for n in lengths)
    assert (report.truncated, report.skipped) == ((long, 0) if overlong == "truncate" else (0, long))
    seen = {}
    padding = 0
    for row in rows:
        cu = row.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == seq_len and cu == sorted(set(cu))
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            ids, labels = row.input_ids[a:b].tolist(), row.labels[a:b].tolist()
            if ids[0] == 7:  # padding
                assert ids == [7] * (b - a) and labels == [-100] * (b - a) and b == seq_len
                padding += b - a
                continue
            c = ids[0] // 1000 - 1
            assert c not in seen, f"conversation {c} appears twice"
            n = lengths[c]
            assert ids == [1000 * (c + 1) + t for t in range(min(n, seq_len))]  # whole, from its start
            assert labels == [-100 if t < n // 2 else x for t, x in enumerate(ids)]
            seen[c] = b - a
    expected = {c for c, n in enumerate(lengths) if n <= seq_len or overlong == "truncate"}
    assert set(seen) == expected and report.conversations == len(expected)
    assert report.padding == padding
    assert "packed whole" in report.describe(seq_len, overlong)


def test_conversation_packing_checks_its_arguments():
    with pytest.raises(DataError, match="overlong must be"):
        pack_conversations(conversations([3]), 8, seed=0, overlong="wrap")
    with pytest.raises(DataError, match="seq_len must be positive"):
        pack_conversations(conversations([3]), 0, seed=0)
