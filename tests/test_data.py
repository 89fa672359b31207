"""Training data: reading every accepted format, tokenizing into a token directory (in worker
processes, the same bytes whatever their number), its checks and one-line refusals, and the rows
cut lazily from it: document boundaries, whole conversations, preference pairs, the seeded order."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arwkv.data.order import permute
from arwkv.data.records import DataError, count_records, iter_records, record_text
from arwkv.data.rows import ConversationRows, DocumentRows, PreferenceRows, collate
from arwkv.data.shards import open_tokens
from arwkv.data.tokenize import open_data, tokenize_corpus
from fixtures import (
    make_run_inputs,
    tiny_teacher,
    token_split,
    vocabulary,
    word_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(vocabulary(50))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved student (its tokenizer: the word tokenizer with a chat template) and text, chat
    and preference data."""
    return make_run_inputs(tmp_path_factory.mktemp("data"))


def tokenize(data, inputs, out, **flags):
    """data tokenized with the inputs' student's tokenizer into out (in this process by default)."""
    return open_tokens(tokenize_corpus(data, inputs["student"], out, **{"workers": 1, **flags}))


def all_documents(tokens, split="all") -> list[list[int]]:
    return [d.tolist() for d in tokens.iter_documents(split)]


# ----------------------------------------------------------------------------- records


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
    assert count_records(d) == 5
    saved = tmp_path / "saved"
    train = datasets.Dataset.from_list([{"text": "w10"}, {"text": "w11"}])
    datasets.DatasetDict({"train": train}).save_to_disk(saved)
    assert [r["text"] for r in iter_records(saved)] == ["w10", "w11"] and count_records(saved) == 2
    single = tmp_path / "single"
    datasets.Dataset.from_list([{"text": "w12"}]).save_to_disk(single)
    assert [r["text"] for r in iter_records(single)] == ["w12"]


def test_chat_records_render_with_the_template(tokenizer, tmp_path):
    messages = {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "w1 w2"}, {"from": "gpt", "value": "w3"}]}
    rendered = "<user> w1 w2 <assistant> w3 "
    assert record_text(messages, tokenizer) == record_text(sharegpt, tokenizer) == rendered
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(messages) + "\n" + json.dumps({"text": "w9"}) + "\n")
    tokens = open_tokens(tokenize_corpus(data, "", tmp_path / "t", workers=1, tokenizer=tokenizer))
    assert all_documents(tokens) == [[2, 6, 7, 3, 8, 0], [14, 0]]  # EOS (id 0) closes each document
    assert tokens.train.loss_mask(0, 8).tolist() == [0, 0, 0, 0, 1, 1, 0, 0]  # the answer and its EOS
    assert tokens.counts == {"text": 1, "chat": 1, "preference": 0}


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ('{"text": "w1"}\n{"text": \n', "b.jsonl:2: not valid JSON at column 1: expecting value"),
    ('{"text": "a\tb"}\n', "b.jsonl:1: not valid JSON at column 12: invalid control character"),
    ('["w1"]\n', "b.jsonl:1: a record must be a JSON object"),
    ('{"body": "w1"}\n', "b.jsonl: record 1: a record needs 'text', a 'messages'/'conversations' list, or"),
    ('{"text": "w1"}\n{"prompt": "w1", "chosen": "w2", "rejected": "w3"}\n',
     "mixes 1 preference pairs with 1 documents"),
])
def test_bad_data_is_one_clear_error_and_leaves_nothing(tmp_path, tokenizer, content, message):
    path = tmp_path / "b.jsonl"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message.replace("(", "\\(").replace("[", "\\[")):
        tokenize_corpus(path, "", out, workers=1, tokenizer=tokenizer)
    assert sorted(os.listdir(tmp_path)) == (["b.jsonl"] if content is not None else [])  # no partial output
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .txt, .jsonl, .parquet files"):
        list(iter_records(empty))


# ----------------------------------------------------------------------------- token directories


def test_workers_write_the_same_bytes_as_one_process(inputs, tmp_path):
    """Two worker processes and one write byte-identical files (text, chat records with their
    loss masks, a validation split), whatever finishes first; and the manifest says what it holds."""
    data = tmp_path / "mixed.jsonl"
    text = inputs["text"].read_text().splitlines()
    chat = inputs["chat"].read_text().splitlines()
    data.write_text("".join(line + "\n" for pair in zip(text, chat, strict=True) for line in pair) * 30)
    one = tokenize(data, inputs, tmp_path / "one", validation_fraction=0.1)
    two = tokenize(data, inputs, tmp_path / "two", workers=2, validation_fraction=0.1)
    for name in one.manifest["files"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert one.manifest["files"] == two.manifest["files"]
    m = one.manifest
    assert m["records"] == {"text": 96 * 30 // 2, "chat": 96 * 30 // 2, "preference": 0}
    assert m["token_dtype"] == "uint16" and m["sources"][0]["bytes"] == data.stat().st_size
    assert m["splits"]["validation"]["documents"] == round(96 * 30 * 0.1)


def test_tokens_are_the_tokenizers_own(tmp_path):
    """The ids written are what the checkpoint's tokenizer gives (the demo's Qwen2 BPE), special
    tokens and non-ASCII text included, each document closed by EOS."""
    from arwkv.loading import load_tokenizer

    teacher = os.path.join(os.path.dirname(__file__), "..", "python", "arwkv", "demo_assets", "teacher")
    tok = load_tokenizer(teacher, "--tokenizer")
    texts = ["def f(x):\n    return x  # ok", "naïve café 北京 🙂", "a<|endoftext|>b", " ", "\n\n\t"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for workers in (1, 2):
        tokens = open_tokens(tokenize_corpus(data, teacher, tmp_path / f"t{workers}", workers=workers))
        expected = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        assert all_documents(tokens) == expected


def test_validation_split_is_exact_seeded_and_the_raw_paths(inputs, tmp_path):
    """round(N * fraction) whole records held out, chosen by the seed; raw --data read with the
    same fraction and seed holds out the same documents as the token directory."""
    from arwkv.loading import load_tokenizer

    tok = load_tokenizer(inputs["student"], "--student")
    n = count_records(inputs["text"])
    splits = {}
    for seed in (0, 1):
        tokens = tokenize(inputs["text"], inputs, tmp_path / f"s{seed}", validation_fraction=0.25, seed=seed)
        held_count = round(n * 0.25)
        assert tokens.validation.documents == held_count and tokens.train.documents == n - held_count
        raw = open_data(inputs["text"], tok, validation_fraction=0.25, seed=seed)
        assert all_documents(raw, "validation") == all_documents(tokens, "validation")
        assert all_documents(raw, "train") == all_documents(tokens, "train")
        splits[seed] = all_documents(tokens, "validation")
        # record i is held out when its place in the seeded permutation is below the count; each
        # split keeps the records' order
        held = permute(np.arange(n), n, seed) < round(n * 0.25)
        ids = [tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
               for r in iter_records(inputs["text"])]
        assert splits[seed] == [d for d, h in zip(ids, held, strict=True) if h]
        assert all_documents(tokens, "train") == [d for d, h in zip(ids, held, strict=True) if not h]
    assert splits[0] != splits[1]
    whole = all_documents(tokenize(inputs["text"], inputs, tmp_path / "all"))
    assert sorted(all_documents(tokens)) == sorted(whole)  # nothing lost, nothing doubled


def test_refusals_are_one_line(inputs, tmp_path):
    from arwkv.loading import load_tokenizer

    tok = load_tokenizer(inputs["student"], "--student")
    good = tmp_path / "good"
    tokens = tokenize(inputs["text"], inputs, good, validation_fraction=0.25)

    def refused(path, match, **kw):
        with pytest.raises(DataError, match=match) as err:
            open_data(path, kw.pop("tokenizer", tok), **kw)
        assert "\n" not in str(err.value)

    # another tokenizer: both fingerprints named
    other = word_tokenizer(vocabulary(50))
    refused(good, f"was tokenized with tokenizer {tokens.fingerprint}, but the model's tokenizer is "
            "[0-9a-f]{16}", tokenizer=other)
    # another split than the one it holds
    refused(good, "holds the split made at tokenize time \\(fraction 0.25, seed 0\\)",
            validation_fraction=0.1)
    open_data(good, tok, validation_fraction=0.25)  # the same split is fine
    # a truncated file; a file altered in place (same size)
    for damage, message in (("truncate", "has 8 bytes, its manifest says"), ("alter", "altered")):
        bad = tmp_path / damage
        tokenize(inputs["text"], inputs, bad)
        f = bad / "train" / "tokens.bin"
        data = f.read_bytes()
        f.write_bytes(data[:8] if damage == "truncate" else bytes([data[0] ^ 1]) + data[1:])
        refused(bad, message)
    # an interrupted writer's directory; not a token directory at all
    half = tmp_path / "half"
    (half / "train").mkdir(parents=True)
    (half / ".arwkv-tokenize-partial").touch()
    refused(half, "whose writing did not finish")
    # tokenize: into a directory holding something else; from a token directory
    with pytest.raises(DataError, match="exists and is not empty"):
        tokenize_corpus(inputs["chat"], inputs["student"], good, workers=1)
    with pytest.raises(DataError, match="is already a token directory"):
        tokenize_corpus(good, inputs["student"], tmp_path / "x", workers=1)


def test_a_saved_dataset_dict_is_raw_data_not_a_token_directory(inputs, tmp_path):
    """A dataset saved with datasets (a train/ folder inside) is read as records, by every command."""
    import datasets

    from arwkv.loading import load_tokenizer

    saved = tmp_path / "saved"
    texts = [r["text"] for r in iter_records(inputs["text"])]
    train = datasets.Dataset.from_list([{"text": t} for t in texts])
    datasets.DatasetDict({"train": train}).save_to_disk(saved)
    tok = load_tokenizer(inputs["student"], "--student")
    from_saved = all_documents(open_data(saved, tok))
    assert from_saved == all_documents(open_data(inputs["text"], tok)) and len(from_saved) == len(texts)
    tokens = open_tokens(tokenize_corpus(saved, inputs["student"], tmp_path / "t", workers=1))
    assert tokens.train.documents == len(texts)
    with pytest.raises(DataError, match="holds --data's"):  # --overwrite never removes what it reads
        tokenize_corpus(saved, inputs["student"], tmp_path, workers=1, overwrite=True)


def test_tokenizing_again_keeps_what_is_up_to_date(inputs, tmp_path):
    out = tmp_path / "t"
    tokenize(inputs["text"], inputs, out)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    time.sleep(0.01)
    lines = []
    tokenize_corpus(inputs["text"], inputs["student"], out, workers=1, log=lines.append)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and "up to date" in lines[-1]
    # --overwrite makes it again; a stale partial directory of a killed run is removed
    stale = tmp_path / f".t.partial-{os.getpid() + 1}"
    stale.mkdir()
    tokenize_corpus(inputs["text"], inputs["student"], out, workers=1, overwrite=True)
    assert (out / "manifest.json").stat().st_mtime_ns != stamp and not stale.exists()


def test_the_tokenize_command(inputs, tmp_path, capsys):
    from arwkv.cli import main

    out = tmp_path / "t"
    argv = ["tokenize", "--data", str(inputs["chat"]), "--tokenizer", str(inputs["student"]),
            "--out", str(out)]
    assert main([*argv, "--workers", "2", "--validation-fraction", "0.1"]) == 0
    err = capsys.readouterr().err
    assert "with 2 worker(s)" in err and f"wrote {out}:" in err and "tokens/s" in err
    assert main(["tokenize", "--data", str(out), "--tokenizer", str(inputs["student"]), "--out",
                 str(tmp_path / "u")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"arwkv tokenize: --data {out} is already a token directory; give it to the command that reads it"]


# ----------------------------------------------------------------------------- rows and their order


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 20), min_size=1, max_size=25), seq_len=st.integers(1, 12))
def test_document_rows_are_the_stream_cut_every_seq_len(tmp_path_factory, lengths, seq_len):
    """Row r is tokens [r S, (r + 1) S) of the documents one after another (the last, shorter
    piece dropped), with a boundary wherever a document starts inside it."""
    docs = [[1000 * (i + 1) + t for t in range(n)] for i, n in enumerate(lengths)]
    rows = DocumentRows(token_split(tmp_path_factory.mktemp("s"), docs), seq_len)
    stream = [t for d in docs for t in d]
    starts, at = set(), 0
    for d in docs:
        starts.add(at)
        at += len(d)
    assert len(rows) == len(stream) // seq_len
    for r in range(len(rows)):
        row = rows[r]
        assert row.input_ids.tolist() == stream[r * seq_len:(r + 1) * seq_len]
        inner = sorted(p - r * seq_len for p in starts if r * seq_len < p < (r + 1) * seq_len)
        assert row.cu_seqlens.tolist() == [0, *inner, seq_len] and row.labels is None


def test_collate_packs_rows_for_the_op(tmp_path):
    source = DocumentRows(token_split(tmp_path, [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12]]), 4)
    rows = [source[r] for r in range(len(source))]
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


def test_teacher_attention_stays_inside_packed_documents(tmp_path):
    """A transformers teacher given collate's position_ids (no attention mask, no cache) sees each
    document alone: the same logits as running the documents one by one."""
    teacher = tiny_teacher().eval()
    source = DocumentRows(token_split(tmp_path, [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16]]), 6)
    batch = collate([source[r] for r in range(len(source))])
    with torch.no_grad():
        packed = teacher(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        cu = batch["cu_seqlens"].tolist()
        flat_ids, flat_logits = batch["input_ids"].flatten(), packed.flatten(0, 1)
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            alone = teacher(flat_ids[a:b][None]).logits[0]
            torch.testing.assert_close(flat_logits[a:b], alone, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**62))
def test_permute_is_a_seeded_bijection(n, seed):
    order = permute(np.arange(n), n, seed)
    assert sorted(order.tolist()) == list(range(n))
    assert permute(np.arange(n), n, seed).tolist() == order.tolist()
    assert permute(np.array([n - 1, 0]), n, seed).tolist() == [order[n - 1], order[0]]  # any index alone
    if n >= 16:
        assert permute(np.arange(n), n, seed + 1).tolist() != order.tolist()
        assert order.tolist() != list(range(n))


def test_sft_labels_cover_only_assistant_tokens(tokenizer):
    from arwkv.data.records import sft_example

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
    from arwkv.data.records import sft_example

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


def conversations(lengths: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Chat examples whose tokens name their conversation (1000 * c + position) and whose loss
    masks mark the second half as the answer."""
    ids = [[1000 * (c + 1) + t for t in range(n)] for c, n in enumerate(lengths)]
    masks = [[int(t >= n // 2) for t in range(n)] for n in lengths]
    return ids, masks


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_conversations_are_packed_whole(tmp_path, overlong):
    """Stage 3's rows: every row is seq_len tokens; each conversation sits whole (or, when longer
    than a row, truncated or left out, as asked, and counted) in one document of one row, with
    its own labels, in order; the rest of a row is padding without labels."""
    lengths = [3, 9, 5, 12, 1, 7, 8, 2, 30, 6]
    seq_len = 10
    rows = ConversationRows(token_split(tmp_path, *conversations(lengths)), seq_len, overlong, pad_id=7)
    report = rows.report
    assert report.rows == len(rows) and all(rows[r].input_ids.numel() == seq_len for r in range(len(rows)))
    long = sum(n > seq_len for n in lengths)
    assert (report.truncated, report.skipped) == ((long, 0) if overlong == "truncate" else (0, long))
    seen = []
    padding = 0
    for r in range(len(rows)):
        row = rows[r]
        cu = row.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == seq_len and cu == sorted(set(cu))
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            ids, labels = row.input_ids[a:b].tolist(), row.labels[a:b].tolist()
            if ids[0] == 7:  # padding
                assert ids == [7] * (b - a) and labels == [-100] * (b - a) and b == seq_len
                padding += b - a
                continue
            c = ids[0] // 1000 - 1
            n = lengths[c]
            assert ids == [1000 * (c + 1) + t for t in range(min(n, seq_len))]  # whole, from its start
            assert labels == [-100 if t < n // 2 else x for t, x in enumerate(ids)]
            seen.append(c)
    expected = [c for c, n in enumerate(lengths) if n <= seq_len or overlong == "truncate"]
    assert seen == expected and report.kept == len(expected)  # each once, in order
    assert report.padding == padding
    assert "packed whole" in rows.describe()


def test_conversation_rows_check_their_arguments(tmp_path):
    split = token_split(tmp_path / "c", *conversations([3]))
    with pytest.raises(DataError, match="overlong must be"):
        ConversationRows(split, 8, overlong="wrap")
    with pytest.raises(DataError, match="seq_len must be positive"):
        ConversationRows(split, 0)
    with pytest.raises(DataError, match="no loss masks"):
        ConversationRows(token_split(tmp_path / "t", [[1, 2]]), 8)


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_preference_pairs_one_a_row(tmp_path, overlong):
    """prompt + chosen, then prompt + rejected, each at most half a row, padding after; labels
    on the answers only. Too long: cut at the end, or the pair left out (always when the prompt
    alone fills a half)."""
    pairs = [([1, 2], [3, 4], [5]), ([6] * 5, [7, 7], [8]), ([9] * 9, [10], [11]), ([12], [13] * 2, [14] * 3)]
    rows = PreferenceRows(token_split(tmp_path, [part for pair in pairs for part in pair]), 12, overlong, 0)
    kept = [0, 3] if overlong == "skip" else [0, 1, 3]
    assert len(rows) == len(kept) and rows.report.skipped == 4 - len(kept)
    for r, p in enumerate(kept):
        prompt, chosen, rejected = pairs[p]
        first = (prompt + chosen)[:6]
        second = (prompt + rejected)[:6]
        row = rows[r]
        used = len(first) + len(second)
        assert row.input_ids.tolist() == first + second + [0] * (12 - used)
        assert row.cu_seqlens.tolist() == [0, len(first), used] + ([12] if used < 12 else [])
        labels = ([-100] * len(prompt) + chosen)[:6] + ([-100] * len(prompt) + rejected)[:6]
        assert row.labels.tolist() == labels + [-100] * (12 - used)
