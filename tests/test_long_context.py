"""``arwkv long-context`` (loss by position, passkey retrieval) and the cache bytes that
plain ``arwkv eval`` reports: buckets and their means against a position-by-position computation
from empty contexts, the sequences made of short documents, passkey prompts (length, depth) and
their scoring, the command end to end for a teacher, a student and a hybrid, and one-line
refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from arwkv.cli import main
from arwkv.conversion.convert import convert_checkpoint
from arwkv.demo import ASSETS
from arwkv.evaluation import long_context
from arwkv.evaluation.long_context import (
    FILLER,
    INTRO,
    KEY_SENTENCE,
    QUESTION,
    PasskeyPrompt,
    bucket_edges,
    contains_key,
    greedy_tokens,
    load_sequences,
    long_context_sequences,
    parse_buckets,
    passkey_grid,
    passkey_key,
    passkey_prompt,
    score_positions,
    settings_lengths,
)
from arwkv.options import LongContextOptions
from fixtures import tiny_teacher, word_tokenizer

# the shipped demo teacher (a real Qwen2 with a byte-level BPE tokenizer): 4 layers of width 192,
# 6 query heads of 32 over 2 key/value heads
LAYERS, HIDDEN, HEAD_DIM, KV_HEADS = 4, 192, 32, 2
HEAD_SIZE = 64  # the students' WKV head size: 3 heads


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The shipped 4-layer Qwen2 teacher, its RWKV-7 student, a hybrid keeping attention in layers
    2 and 3 (time mixing in 0 and 1: arwkv convert --wkv-layers 0,1), the held-out text, and a
    text of 11 tokens."""
    root = tmp_path_factory.mktemp("long-context")
    teacher = ASSETS / "teacher"
    short = root / "short.jsonl"
    short.write_text(json.dumps({"text": "def f(x):"}) + "\n" + json.dumps({"text": "return x"}) + "\n")
    return {
        "teacher": teacher,
        "student": convert_checkpoint(teacher, root / "student", head_size=HEAD_SIZE, dtype="fp32"),
        "hybrid": convert_checkpoint(teacher, root / "hybrid", head_size=HEAD_SIZE, dtype="fp32",
                                     wkv_layers=[0, 1]),
        "text": ASSETS / "heldout.jsonl",
        "short": short,
    }


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# Buckets and loss by position


@pytest.mark.parametrize("max_len", [2, 3, 64, 100, 2048])
@pytest.mark.parametrize("spacing", ["log", "linear"])
def test_buckets_cover_every_predicted_position_once(max_len, spacing):
    for n in sorted({1, max_len // 2 or 1, max_len - 1}):
        edges = bucket_edges(max_len, n, spacing)
        assert edges[0] == 1 and edges[-1] == max_len  # positions 1 ... max_len - 1, each in one bucket
        assert all(b > a for a, b in zip(edges, edges[1:], strict=False))
        assert len(edges) - 1 <= n  # rounding may merge buckets narrower than one position
    assert bucket_edges(2048, 11, "log") == [2**i for i in range(12)]  # powers of two
    assert bucket_edges(101, 4, "linear") == [1, 26, 51, 76, 101]
    assert bucket_edges(64, [1, 8, 64]) == [1, 8, 64]
    assert parse_buckets("16") == 16 and parse_buckets("1,8,64") == [1, 8, 64]


@pytest.mark.parametrize("bad, message", [
    (dict(max_len=1), "--max-len must be at least 2"),
    (dict(buckets=0), "give 1 to 63 buckets"),
    (dict(buckets=64), "give 1 to 63 buckets"),
    (dict(buckets=[1, 8, 8, 64]), "not strictly increasing"),
    (dict(buckets=[0, 8, 64]), "edges must lie in [1, --max-len 64]"),
    (dict(buckets=[1, 8, 65]), "edges must lie in [1, --max-len 64]"),
    (dict(buckets=[8]), "at least two edges"),
])
def test_bad_buckets_are_one_line(bad, message):
    args = dict(max_len=64, buckets=8) | bad
    with pytest.raises(ValueError) as err:
        bucket_edges(**args)
    assert message in str(err.value) and "\n" not in str(err.value)


def _direct_losses(model, row: list[int]) -> list[float]:
    """The NLL of each token t >= 1 from a forward of tokens 0 ... t - 1 alone: position by
    position from an empty context, the slow way."""
    losses = [math.nan]
    with torch.no_grad():
        for t in range(1, len(row)):
            logits = model(torch.tensor([row[:t]]), use_cache=False).logits[0, -1]
            losses.append(F.cross_entropy(logits[None].float(), torch.tensor([row[t]])).item())
    return losses


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_bucket_means_equal_a_position_by_position_computation(models, which):
    model = _load(models[which])
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 2048, (3, 20), generator=g).tolist()
    edges = [1, 2, 5, 12, 20]
    scored = score_positions(model, rows, edges, batch_size=2)
    direct = torch.tensor([_direct_losses(model, r) for r in rows], dtype=torch.float64)  # [S, L]
    assert torch.allclose(scored.per_position()[1:], direct[:, 1:].mean(0), rtol=1e-4, atol=1e-5)
    assert math.isnan(scored.per_position()[0])
    summary = scored.summary()
    assert [(b["start"], b["end"]) for b in summary["buckets"]] == [(1, 2), (2, 5), (5, 12), (12, 20)]
    for b in summary["buckets"]:
        block = direct[:, b["start"] : b["end"]]
        assert b["tokens"] == block.numel()
        assert b["mean_loss"] == pytest.approx(block.mean().item(), rel=1e-4)
        assert b["perplexity"] == pytest.approx(math.exp(b["mean_loss"]))
        assert b["sem"] == pytest.approx((block.mean(1).std() / math.sqrt(3)).item(), rel=1e-3, abs=1e-6)
    assert summary["tokens"] == 3 * 19 and summary["sequences"] == 3
    assert summary["mean_loss"] == pytest.approx(direct[:, 1:].mean().item(), rel=1e-4)
    one_at_a_time = score_positions(model, rows, edges, batch_size=1).summary()
    assert one_at_a_time["mean_loss"] == pytest.approx(summary["mean_loss"], rel=1e-5)


def test_short_documents_are_concatenated_long_ones_cut_from_their_start():
    eos = 0  # after each document
    long_doc = list(range(10, 19)) + [eos]
    docs = [[1, 2, eos], [3, eos], long_doc, [4, 5, eos], [6, 7, 8, eos], [9, eos], [1, eos]]
    made = long_context_sequences(docs, 4)
    assert made.rows == [
        [1, 2, eos, 3],
        [10, 11, 12, 13],  # a long document: pieces from its start
        [14, 15, 16, 17],
        [eos, 18, eos, 4],  # the concatenation goes on with the long one's tail
        [6, 7, 8, eos],  # a document of exactly max_len tokens: a row of its own
        [5, eos, 9, eos],
    ]
    assert made.whole == [False, True, True, False, True, False] and made.from_long_documents == 3
    assert made.tokens_dropped == 2 and made.documents == 7  # [1, eos] left over
    assert sum(map(len, made.rows)) + made.tokens_dropped == sum(map(len, docs))
    assert made.head(2).rows == made.rows[:2] and made.head(2).from_long_documents == 1
    assert long_context_sequences(docs, 100).rows == []


def test_sequences_from_a_file_have_eos_between_documents(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["w1 w2", "w3", "w4 w5 w6", "w7"]))
    tokenizer = word_tokenizer()
    eos = tokenizer.eos_token_id
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ["w1", "w2", "w3", "w4", "w5", "w6", "w7"]}
    made = load_sequences(tokenizer, data, 5)
    assert made.rows == [[ids["w1"], ids["w2"], eos, ids["w3"], eos], [ids["w4"], ids["w5"], ids["w6"], eos,
                                                                        ids["w7"]]]
    assert load_sequences(tokenizer, data, 5, max_sequences=1).rows == made.rows[:1]
    with pytest.raises(ValueError, match="gives 11 tokens, fewer than --max-len 64"):
        load_sequences(tokenizer, data, 64)


# ---------------------------------------------------------------------------------------------
# Passkey retrieval


@pytest.fixture(scope="module")
def bpe():
    """The shipped demo teacher's byte-level BPE tokenizer (Qwen2's pre-tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "teacher")


@pytest.mark.parametrize("length", [120, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_has_the_length_and_the_key_at_the_depth(bpe, length, depth):
    key = passkey_key(0, length, depth, 0)
    prompt = passkey_prompt(bpe, length, depth, key)
    sentences = [len(bpe(" " + s, add_special_tokens=False).input_ids) for s in FILLER]
    assert length - min(sentences) < len(prompt.ids) <= length
    text = bpe.decode(prompt.ids)
    assert text.startswith(INTRO) and text.endswith(" " + QUESTION)
    assert text.count(str(key)) == 2  # once in each half of the key sentence, nowhere else
    key_ids = bpe(" " + KEY_SENTENCE.format(key=key), add_special_tokens=False).input_ids
    assert prompt.ids[prompt.key_start : prompt.key_start + len(key_ids)] == key_ids
    intro = len(bpe(INTRO, add_special_tokens=False).input_ids)
    before = prompt.key_start - intro  # filler tokens before the key sentence
    assert before == round(prompt.depth * prompt.filler_tokens)
    assert abs(before - depth * prompt.filler_tokens) <= max(sentences) / 2  # the nearest sentence boundary
    if depth == 0.0:
        assert before == 0
    if depth == 1.0:
        assert before == prompt.filler_tokens
    question = len(bpe(" " + QUESTION, add_special_tokens=False).input_ids)
    assert len(prompt.ids) == intro + prompt.filler_tokens + len(key_ids) + question


def test_passkey_keys_are_seeded_and_shared_by_all_models():
    keys = [passkey_key(0, 256, 0.5, t) for t in range(20)]
    assert keys == [passkey_key(0, 256, 0.5, t) for t in range(20)]  # the same for every model
    assert len(set(keys)) > 15 and all(10000 <= k <= 99999 for k in keys)
    assert keys != [passkey_key(1, 256, 0.5, t) for t in range(20)]


def test_passkey_prompt_refuses_a_length_with_no_room_for_filler(bpe):
    with pytest.raises(ValueError, match="--passkey-lengths: 40 tokens is too short"):
        passkey_prompt(bpe, 40, 0.5, 12345)
    with pytest.raises(ValueError, match="outside"):
        passkey_prompt(bpe, 400, 1.5, 12345)


def test_contains_key_reads_the_digits_in_order():
    assert contains_key(" 12345. Remember", 12345)
    assert contains_key(" 1 2 3 4 5", 12345)  # tokenizers that split digits, decoded with spaces
    assert contains_key("9912345", 12345)
    assert not contains_key(" 1234", 12345) and not contains_key(" 54321", 12345)
    assert not contains_key("", 12345)


@pytest.mark.parametrize("answer, expected", [("always", 1.0), ("never", 0.0), ("even trials", 0.5)])
def test_passkey_accuracy_is_counted_per_cell(monkeypatch, bpe, answer, expected):
    """answer_prompts replaced by a fake model's answers: the key, a wrong number, or the key on
    even trials only."""

    def fake_answers(model, tokenizer, prompts: list[PasskeyPrompt], new_tokens, batch_size=1):
        out = []
        for trial, p in enumerate(prompts):
            right = answer == "always" or (answer == "even trials" and trial % 2 == 0)
            out.append(f" {p.key}. Remember it." if right else f" {(p.key + 1) % 100000:05d}.")
        return out

    monkeypatch.setattr(long_context, "answer_prompts", fake_answers)
    grid = passkey_grid(torch.nn.Linear(1, 1), bpe, [150, 300], [0.0, 0.5, 1.0], 4, new_tokens=8)
    assert [(c["length"], c["depth"]) for c in grid["grid"]] == [
        (150, 0.0), (150, 0.5), (150, 1.0), (300, 0.0), (300, 0.5), (300, 1.0)]
    assert all(c["accuracy"] == expected and c["trials"] == 4 for c in grid["grid"])
    assert all(c["correct"] == round(expected * 4) for c in grid["grid"])
    assert grid["accuracy"] == expected


@pytest.mark.parametrize("which", ["teacher", "student", "hybrid"])
def test_greedy_tokens_with_the_cache_equal_recomputing_the_whole_prompt(models, which):
    model = _load(models[which])
    ids = torch.randint(5, 2048, (2, 9), generator=torch.Generator().manual_seed(3))
    fast = greedy_tokens(model, ids, 5)
    slow = ids
    with torch.no_grad():
        for _ in range(5):
            slow = torch.cat([slow, model(slow, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(fast, slow[:, 9:])


# ---------------------------------------------------------------------------------------------
# The command


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_long_context_command_writes_json_and_png(models, tmp_path, capsys):
    out = tmp_path / "lc"
    names = ["teacher", "student", "hybrid"]
    rc, stdout, err = _run(["long-context", "--model", *(str(models[n]) for n in names),
                            "--data", str(models["text"]), "--out", str(out), "--max-len", "128",
                            "--buckets", "4", "--max-sequences", "3", "--passkey-lengths", "96,128",
                            "--passkey-depths", "0,1", "--passkey-trials", "2", "--device", "cpu",
                            "--batch-size", "2"], capsys)
    assert rc == 0, err
    report = json.loads((out / "long_context.json").read_text())
    assert json.loads(stdout) == report  # the same object on stdout
    assert (out / "long_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = report["settings"]
    edges = settings["buckets"]["edges"]
    assert edges[0] == 1 and edges[-1] == 128 and settings["buckets"]["spacing"] == "log"
    assert settings["max_len"] == 128 and settings["passkey"]["lengths"] == [96, 128]
    assert [m["name"] for m in report["models"]] == names
    for m in report["models"]:
        loss = m["loss_by_position"]
        assert loss["sequences"] == 3 and loss["tokens"] == 3 * 127
        assert [(b["start"], b["end"]) for b in loss["buckets"]] == list(zip(edges, edges[1:], strict=False))
        assert sum(b["tokens"] for b in loss["buckets"]) == loss["tokens"]
        assert all(math.isfinite(b["mean_loss"]) and b["mean_loss"] > 0 for b in loss["buckets"])
        grid = m["passkey"]["grid"]
        assert [(c["length"], c["depth"]) for c in grid] == [(96, 0), (96, 1), (128, 0), (128, 1)]
        assert all(c["trials"] == 2 and 0 <= c["accuracy"] <= 1 for c in grid)
        assert all(length - 5 <= c["prompt_tokens"][0] <= c["prompt_tokens"][1] <= length
                   for c, length in zip(grid, [96, 96, 128, 128], strict=True))
        assert all(c["example"]["key"] == passkey_key(0, c["length"], c["depth"], 0) for c in grid)
    cache = {m["name"]: m["cache_bytes"]["per_token"] for m in report["models"]}
    assert cache == {"teacher": 2 * LAYERS * KV_HEADS * HEAD_DIM * 4, "student": 0,
                     "hybrid": 2 * 2 * KV_HEADS * HEAD_DIM * 4}
    assert "arwkv long-context: teacher: loss by position" in err and "arwkv long-context: wrote" in err
    # the default passkey lengths, loss by position only, and passkey only
    assert settings_lengths(LongContextOptions(max_len=2048)) == [256, 512, 1024, 2048]
    assert settings_lengths(LongContextOptions(max_len=200)) == [200]
    rc, _, err = _run(["long-context", "--overwrite", "--model", str(models["student"]), "--data",
                       str(models["text"]), "--out", str(out), "--max-len", "32", "--passkey-trials", "0",
                       "--max-sequences", "2", "--buckets", "1,4,16,32", "--device", "cpu"], capsys)
    assert rc == 0, err
    only_loss = json.loads((out / "long_context.json").read_text())
    assert only_loss["settings"]["passkey"] is None and "passkey" not in only_loss["models"][0]
    assert only_loss["settings"]["buckets"]["spacing"] == "given"
    assert [b["start"] for b in only_loss["models"][0]["loss_by_position"]["buckets"]] == [1, 4, 16]
    rc, _, err = _run(["long-context", "--overwrite", "--model", str(models["teacher"]), "--out", str(out),
                       "--max-len", "100", "--passkey-trials", "1", "--device", "cpu"], capsys)
    assert rc == 0, err
    only_passkey = json.loads((out / "long_context.json").read_text())
    assert "loss_by_position" not in only_passkey["models"][0]
    assert len(only_passkey["models"][0]["passkey"]["grid"]) == 5  # one length (100) x five depths


@pytest.mark.parametrize("args, message", [
    (["--passkey-trials", "1"], "--out is required"),
    (["--out", "{out}", "--passkey-depths", "0,1.5"], "--passkey-depths: 1.5 is outside [0, 1]"),
    (["--out", "{out}", "--passkey-lengths", "64,4096"],
     "--passkey-lengths: 4096 is outside [2, --max-len 2048]"),
    (["--out", "{out}", "--max-len", "64", "--passkey-lengths", "20"],
     "--passkey-lengths: 20 tokens is too short"),
    (["--out", "{out}", "--max-len", "1"], "--max-len must be at least 2"),
    (["--out", "{out}", "--passkey-depths", "0,0.5,0.5"], "--passkey-depths: 0.5 is given twice"),
    (["--out", "{out}", "--buckets", "1,8,4"], "--buckets: edges [1, 8, 4] are not strictly"),
    (["--out", "{out}", "--passkey-trials", "0"],
     "give --data (loss by position) and/or --passkey-trials > 0"),
    (["--out", "{out}", "--passkey-trials", "-1"], "--passkey-trials must be at least 0"),
    (["--out", "{out}", "--data", "{missing}"], "does not exist"),
    (["--out", "{out}", "--max-len", "64", "--data", "{short}", "--passkey-trials", "0"],
     "fewer than --max-len 64: no sequence to score"),
])
def test_bad_flags_are_one_line(models, tmp_path, capsys, args, message):
    values = {"out": str(tmp_path / "lc"), "missing": str(tmp_path / "missing.jsonl")}
    values |= {name: str(models[name]) for name in ("text", "short", "student")}
    argv = ["long-context", "--device", "cpu", "--model", str(models["teacher"])]
    argv += [a.format(**values) for a in args]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 1 and stdout == ""
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("arwkv long-context: ") and message in err, err
    assert not (tmp_path / "lc").exists()  # refused before anything was written


@pytest.mark.parametrize("argv, message", [
    (["long-context", "--model", "{teacher}", "--out", "{out}", "--passkey-depths", "0,x"],
     "argument --passkey-depths: 'x' is not a number"),
    (["long-context", "--model", "{teacher}", "--out", "{out}", "--seq-len", "64"],
     "unrecognized arguments: --seq-len 64"),
    (["eval", "--model", "{teacher}", "{student}", "--data", "{text}"], "unrecognized arguments: "),
    (["eval", "--model", "{teacher}", "--data", "{text}", "--out", "{out}"], "unrecognized arguments: --out"),
    (["eval", "--model", "{teacher}", "--data", "{text}", "--passkey-trials", "3"],
     "unrecognized arguments: --passkey-trials 3"),
])
def test_unreadable_command_lines_are_one_line(models, tmp_path, capsys, argv, message):
    values = {"out": str(tmp_path / "lc")}
    values |= {name: str(models[name]) for name in ("text", "student", "teacher")}
    rc, stdout, err = _run([a.format(**values) for a in argv], capsys)
    assert rc == 2 and stdout == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"arwkv {argv[0]}: ") and message in err and "--help" in err, err
    assert not (tmp_path / "lc").exists()


def test_long_context_refuses_to_overwrite(models, tmp_path, capsys):
    out = tmp_path / "lc"
    argv = ["long-context", "--model", str(models["student"]), "--out", str(out), "--max-len", "100",
            "--passkey-trials", "1", "--passkey-depths", "0.5", "--device", "cpu"]
    assert _run(argv, capsys)[0] == 0
    before = (out / "long_context.json").read_bytes()
    rc, _, err = _run(argv[:-2] + ["--passkey-depths", "0,1", "--device", "cpu"], capsys)
    assert rc == 1 and "already holds long_context.json (--overwrite replaces it)" in err, err
    assert (out / "long_context.json").read_bytes() == before  # untouched
    assert _run(argv + ["--overwrite"], capsys)[0] == 0


# ---------------------------------------------------------------------------------------------
# Cache bytes in plain arwkv eval


def test_plain_eval_reports_cache_bytes_per_token(models, capsys):
    # per time-mixing layer: the token shift [C] and the WKV state [H, N, N], float32
    per_layer_state = HIDDEN * 4 + (HIDDEN // HEAD_SIZE) * HEAD_SIZE * HEAD_SIZE * 4
    kv_per_token = 2 * KV_HEADS * HEAD_DIM * 4  # keys and values of one attention layer, float32
    expected = {
        "teacher": {"constant": 0, "per_token": LAYERS * kv_per_token},
        "student": {"constant": LAYERS * per_layer_state, "per_token": 0},
        "hybrid": {"constant": 2 * per_layer_state, "per_token": 2 * kv_per_token},
    }
    for name, want in expected.items():
        rc, stdout, err = _run(["eval", "--model", str(models[name]), "--data", str(models["text"]),
                                "--seq-len", "32", "--max-tokens", "200", "--device", "cpu"], capsys)
        assert rc == 0, err
        report = json.loads(stdout)
        assert report["perplexity"] > 1
        assert report["cache_bytes"] == want | {"lengths": [16, 48]}, name


def test_cache_growth_of_a_transformers_cache():
    from arwkv.evaluation.perplexity import cache_growth

    teacher = tiny_teacher(layers=3, hidden=128)  # 4 heads of 32 over 2 key/value heads
    assert cache_growth(teacher, [5, 6, 7], (8, 24)) == {"constant": 0, "per_token": 2 * 3 * 2 * 32 * 4,
                                                         "lengths": [8, 24]}
    with pytest.raises(ValueError, match="0 < short < long"):
        cache_growth(teacher, [5], (24, 8))


def test_markers_beyond_the_scored_positions_do_not_stretch_the_axis():
    """The quick demo scores positions up to 32; the teacher's training length (256) is not drawn
    there, so the axis ends with the data (it ran to 256)."""
    from arwkv.evaluation.long_context import describe_settings, long_context_figure

    settings = describe_settings(LongContextOptions(max_len=32, buckets="3", passkey_trials=0))
    edges = settings["buckets"]["edges"]
    buckets = [{"start": a, "end": b, "mean_loss": 2.0, "sem": 0.1, "tokens": b - a}
               for a, b in zip(edges, edges[1:], strict=False)]
    loss = {"buckets": buckets, "mean_loss": 2.0, "sequences": 2, "tokens": 62}
    report = {"settings": settings, "models": [{"name": "student", "loss_by_position": loss}]}
    fig = long_context_figure(report, {"teacher trained at 256": 256, "student distilled at 16": 16})
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert ax.get_xlim()[1] < 64 and labels[-1] == "student distilled at 16"
    assert "teacher trained at 256" not in labels
