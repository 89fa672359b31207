"""Regenerates the demo's assets in python/arwkv/demo_assets/ (what `arwkv demo` distils):

- train.jsonl / heldout.jsonl: text that ships with Python itself — the pydoc topics
  (``pydoc_data.topics``) and the docstrings of the standard library's top-level modules —
  one record per document, 10% of the documents held out (chosen by a hash of their text);
- teacher/: a byte-level BPE tokenizer (Qwen2's pre-tokenizer, ChatML special tokens) trained on
  train.jsonl, and a genuine Qwen2ForCausalLM (GQA, RMSNorm, SwiGLU, RoPE, tied embeddings)
  trained on it from a fixed seed, in float32;
- teacher/training_report.json: held-out perplexity of the teacher and of a unigram model;
- heldout_task.yaml: the held-out split as an lm-evaluation-harness task.

    .venv/bin/python tools/make_demo_teacher.py [--out python/arwkv/demo_assets]

The defaults made the shipped teacher. Deterministic for a given Python (its stdlib text), torch
version and thread count (2): a rerun gives the same files (checked bit for bit on short runs);
the full run takes about 20 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# `arwkv eval --lm-eval-task` reads it (data_files relative to this file)
LM_EVAL_TASK = """\
# lm-evaluation-harness task: rolling log-likelihood of the demo's held-out documents
task: arwkv_demo_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: heldout.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def python_documents() -> list[str]:
    """pydoc topics (sorted by name) and stdlib docstrings of >= 200 characters (sorted by file)."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)]
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.append(doc.strip())
    seen, unique = set(), []
    for d in docs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def split(docs: list[str], heldout_every: int = 10) -> tuple[list[str], list[str]]:
    """Held out: the documents whose sha256 falls in one tenth of the hash space."""

    def bucket(d: str) -> int:
        return int(hashlib.sha256(d.encode()).hexdigest()[:8], 16) % heldout_every

    return [d for d in docs if bucket(d)], [d for d in docs if not bucket(d)]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A Qwen2-style byte-level BPE, returned as transformers' Qwen2Tokenizer (what AutoTokenizer
    builds for a qwen2 checkpoint)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    qwen = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, eos_token=SPECIAL[0], pad_token=SPECIAL[0]
    )
    qwen.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    qwen.chat_template = CHAT_TEMPLATE
    return qwen


def unigram_perplexity(train: list[list[int]], heldout: list[list[int]], vocab: int) -> float:
    """Add-one-smoothed unigram model fitted on the training tokens, scored on the held-out ones
    (the same tokens the teacher predicts: every token after a window's first)."""
    counts = torch.ones(vocab, dtype=torch.float64)
    for d in train:
        counts += torch.bincount(torch.tensor(d), minlength=vocab).double()
    logp = (counts / counts.sum()).log()
    nll = sum(-logp[torch.tensor(d[1:])].sum().item() for d in heldout if len(d) > 1)
    return math.exp(nll / sum(len(d) - 1 for d in heldout if len(d) > 1))


def pack_documents(docs: list[list[int]], seq_len: int, seed: int) -> list:
    """The documents in a seeded order, one after another, cut into rows of seq_len tokens with
    their document starts (how the shipped teacher's training rows were made; arwkv distill now
    cuts rows lazily from a token directory, in the documents' own order)."""
    from arwkv.data.rows import PackedRow

    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    stream = [t for i in order for t in docs[i]]
    starts, at = set(), 0
    for i in order:
        starts.add(at)
        at += len(docs[i])
    rows = []
    for r in range(len(stream) // seq_len):
        inner = sorted(p - r * seq_len for p in starts if 0 < p - r * seq_len < seq_len)
        rows.append(
            PackedRow(
                torch.tensor(stream[r * seq_len : (r + 1) * seq_len]),
                torch.tensor([0, *inner, seq_len], dtype=torch.int32),
            )
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "python/arwkv/demo_assets")
    )
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from arwkv.data.rows import collate
    from arwkv.evaluation.perplexity import score_windows, windows

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "teacher").mkdir(parents=True)
    train_docs, heldout_docs = split(python_documents())
    for name, docs in (("train.jsonl", train_docs), ("heldout.jsonl", heldout_docs)):
        with (tmp / name).open("w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    (tmp / "heldout_task.yaml").write_text(LM_EVAL_TASK)
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    eos = tokenizer.eos_token_id
    train_ids = [tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in train_docs]
    heldout_ids = [tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in heldout_docs]
    print(
        f"{len(train_docs)} training documents ({sum(map(len, train_ids))} tokens), {len(heldout_docs)} "
        f"held out ({sum(map(len, heldout_ids))} tokens), vocabulary {len(tokenizer)}",
        file=sys.stderr,
    )

    C = args.hidden_size
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=C,
        intermediate_size=8 * C // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=C // 32,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = Qwen2ForCausalLM(config)
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(
            (s + 1) / warmup,
            0.5 * (1 + math.cos(math.pi * min(max(s - warmup, 0) / max(args.steps - warmup, 1), 1.0))) * 0.9
            + 0.1,
        ),
    )
    start, epoch, rows = time.perf_counter(), 0, []
    model.train()
    for step in range(args.steps):
        if len(rows) < args.batch_size:
            rows += pack_documents(train_ids, args.seq_len, seed=epoch)
            epoch += 1
        batch, rows = collate(rows[: args.batch_size]), rows[args.batch_size :]
        loss = model(
            batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - start:.0f} s", file=sys.stderr)

    model.eval()
    nll, count = score_windows(model, windows(heldout_ids, 256))  # as arwkv eval scores it
    report = {
        "teacher_heldout_ppl": math.exp(nll / count),
        "unigram_heldout_ppl": unigram_perplexity(
            train_ids, [p for p in windows(heldout_ids, 256)], len(tokenizer)
        ),
        "heldout_tokens_predicted": count,
        "train_tokens": sum(map(len, train_ids)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "seconds": time.perf_counter() - start,
        "arguments": vars(args),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    model.save_pretrained(tmp / "teacher")
    tokenizer.save_pretrained(tmp / "teacher")
    (tmp / "teacher" / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
