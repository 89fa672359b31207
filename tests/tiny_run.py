"""A whole distillation set-up small enough for tests: a word-level tokenizer with a chat
template, a tiny Qwen2 teacher saved with it, its converted student, and text and chat data
drawn from a fixed Markov chain over the words (so there is something to learn)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["<eos>", "<unk>", "<user>", "<assistant>", "<system>"] + [f"w{i}" for i in range(59)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def markov_text(g: torch.Generator, length: int) -> str:
    """Words where each one mostly determines the next (w_i -> w_{(3 i + 1) mod 59} or a random one)."""
    i = int(torch.randint(59, (1,), generator=g))
    out = []
    for _ in range(length):
        out.append(f"w{i}")
        i = (
            (3 * i + 1) % 59
            if torch.rand((), generator=g) < 0.8
            else int(torch.randint(59, (1,), generator=g))
        )
    return " ".join(out)


def make_run_inputs(
    root: Path, layers: int = 2, hidden: int = 64, docs: int = 48, seed: int = 0
) -> dict[str, Path]:
    """root/teacher, root/student (converted, fp32), root/text.jsonl, root/chat.jsonl."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from arwkv.convert import convert_checkpoint

    torch.manual_seed(seed)
    teacher = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(WORDS),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            eos_token_id=0,
            max_position_embeddings=512,
        )
    )
    teacher.save_pretrained(root / "teacher")
    word_tokenizer().save_pretrained(root / "teacher")
    convert_checkpoint(root / "teacher", root / "student", head_size=16, dtype="fp32")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 40, (docs,), generator=g).tolist()
    with (root / "text.jsonl").open("w") as f:
        for n in lengths:
            f.write(json.dumps({"text": markov_text(g, n)}) + "\n")
    with (root / "chat.jsonl").open("w") as f:
        for n in lengths:
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": markov_text(g, max(n // 3, 2))},
                            {"role": "assistant", "content": markov_text(g, n)},
                        ]
                    }
                )
                + "\n"
            )
    return {
        "teacher": root / "teacher",
        "student": root / "student",
        "text": root / "text.jsonl",
        "chat": root / "chat.jsonl",
    }
