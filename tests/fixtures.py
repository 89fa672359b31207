"""What the tests share, in one place (no test module imports another):

- the ops and their step-by-step references by name, and the devices the op tests run on;
- the reference grid (dtypes, head sizes, lengths, tolerances), its cached float64 results, and
  its two tiers: a default one (every pair of axis values, plus a fixed seeded sample of the
  rest) and the full grid (the rest is marked `slow`: `make test` deselects it, `make test-full`
  runs it);
- a tiny random teacher of several families;
- a whole distillation set-up small enough for tests: a word-level tokenizer with a chat
  template, a tiny Qwen2 teacher saved with it, its converted student, and text and chat data
  drawn from a fixed Markov chain over the words (so there is something to learn);
- copies of helpers only the tests use (so the product need not keep them).
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import arwkv_ext
from arwkv_ext.reference import wkv6_reference, wkv7_reference
from arwkv_ext.testing import make_inputs

# ---------------------------------------------------------------------------------------------
# The ops and where they run

OP_NAMES = ["wkv7", "wkv6"]
OPS = {"wkv7": arwkv_ext.wkv7, "wkv6": arwkv_ext.wkv6}
REFERENCES = {"wkv7": wkv7_reference, "wkv6": wkv6_reference}

# A GPU case runs only where there is a GPU and the extension was built with kernels for it.
NEEDS_GPU = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: torch.cuda.is_available() is False"),
    pytest.mark.skipif(len(arwkv_ext.build_info["kernels"]) < 2,
                       reason="arwkv_ext was built without GPU kernels (CPU only)"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_GPU)]
CPU_ALGORITHMS = ["step", "chunked"]  # ARWKV_CPU_ALGORITHM: the CPU kernels' two algorithms
GPU_ALGORITHMS = ["step", "chunked"]  # ARWKV_GPU_ALGORITHM: the GPU kernels' two algorithms


def on(device, xs):
    """The tensors of xs on device (None stays None)."""
    return [None if x is None else x.to(device) for x in xs]


def output_names(op: str, with_state: bool) -> list[str]:
    """Names of run_with_grads' results in order: y, final_state, then each input's gradient."""
    out = ["y", "final_state", "r", "w", "k", "v"] + (["a", "b"] if op == "wkv7" else ["u"])
    return out + (["initial_state"] if with_state else [])


def flat(result) -> list[torch.Tensor]:
    """run_with_grads' (y, final_state, grads) as one list, in output_names' order."""
    y, state, grads = result
    return [y, state, *grads]


# ---------------------------------------------------------------------------------------------
# The reference grid: dtype x N x T x with/without initial_state x with/without cu_seqlens

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative Frobenius error against float64. 16-bit inputs return y and gradients rounded to
# 16 bits, so their bound reflects that rounding, not the float32 arithmetic inside.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
HEAD_SIZES = list(arwkv_ext.HEAD_SIZES)  # the kernels' own list (kHeadSizes in csrc/wkv_problem.h)
# One step, two, the 16-step chunk -1 / exactly / +1, several chunks, and a long one that ends
# in a partial chunk. (T = 0 is tested in test_ops.py and test_hypothesis.py.)
LENGTHS = [1, 2, 15, 16, 17, 100, 1000]
GRID_HEADS = 2
GRADS_FROM = ["y", "state", "both"]  # the loss: from y only, from the final state only, both


def packing(T: int) -> list[int]:
    """Up to three packed sequences of uneven lengths covering [0, T)."""
    cuts = sorted({0, T // 3, (2 * T) // 3 + 1, T} - {T + 1})
    return [c for c in cuts if c <= T]


@functools.cache
def reference(op: str, N: int, T: int, with_state: bool, packed: bool):
    """float64 reference with gradients from y and from the state, shared by every dtype.

    The inputs are rounded to bfloat16 once, so float32, bfloat16 and float16 copies of them
    hold the same numbers and one float64 reference serves all three.
    """
    B, H = 1 if packed else 2, GRID_HEADS
    inputs = [x.to(torch.bfloat16).float() for x in make_inputs(op, B, T, H, N, seed=N * 1000 + T)]
    cu = torch.tensor(packing(T), dtype=torch.int32) if packed else None
    S = len(packing(T)) - 1 if packed else B
    g = torch.Generator().manual_seed(T)
    s0 = torch.randn(S, H, N, N, generator=g) * 0.3 if with_state else None  # non-symmetric
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    gs = torch.randn(S, H, N, N, generator=g, dtype=torch.float64)
    leaves = [x.double().requires_grad_() for x in inputs]
    if s0 is not None:
        leaves.append(s0.double().requires_grad_())
    y, state = REFERENCES[op](*leaves[: len(inputs)], leaves[-1] if s0 is not None else None, cu)
    g_y = torch.autograd.grad((y * gy).sum(), leaves, retain_graph=True, allow_unused=True)
    g_s = torch.autograd.grad((state * gs).sum(), leaves, allow_unused=True)
    zero = [torch.zeros_like(x) for x in leaves]
    g_y = [z if g is None else g for g, z in zip(g_y, zero, strict=True)]
    g_s = [z if g is None else g for g, z in zip(g_s, zero, strict=True)]
    return inputs, s0, cu, gy, gs, y.detach(), state.detach(), g_y, g_s


# ---------------------------------------------------------------------------------------------
# The grid's two tiers. The full grid (test_reference_grid.py: op x dtype x N x T x state x
# packing x gradients x CPU algorithm, 4032 cases) is mostly float64 references at T = 1000,
# which cost seconds each. The default tier is
#   1. a covering set: every pair of values of any two axes appears in some case (so each value
#      of each axis does, and a kernel wrong for one value of one axis fails a test), chosen
#      greedily, cheapest new reference first (the long length goes with small heads or packed
#      sequences where a pair allows);
#   2. plus GRID_SAMPLE more cases drawn with random.Random(GRID_SEED) from the rest of the grid
#      whose reference is cheap (estimated under CHEAP_REFERENCE_S) or already computed by 1.
# Both are fixed (no clock, no hash order): the same cases on every run and every machine. Every
# other case is marked `slow`: `pytest -m "not slow"` (make test) skips it, make test-full and a
# plain `pytest tests/test_reference_grid.py` run it.

SLOW = pytest.mark.slow
GRID_AXES = {
    "op": OP_NAMES,
    "dtype": list(DTYPES),
    "N": HEAD_SIZES,
    "T": LENGTHS,
    "with_state": [False, True],
    "packed": [False, True],
    "grads_from": GRADS_FROM,
    "cpu_algorithm": CPU_ALGORITHMS,
}
GRID_SAMPLE = 200
GRID_SEED = 0
CHEAP_REFERENCE_S = 0.45  # in effect: T <= 100 (and T = 1000 for WKV-6 on packed N = 16)


def reference_key(case: dict) -> tuple:
    """The arguments of reference() a grid case uses (the references are shared by its dtypes,
    gradients and algorithms)."""
    return case["op"], case["N"], case["T"], case["with_state"], case["packed"]


def reference_seconds(op: str, N: int, T: int, with_state: bool, packed: bool) -> float:
    """A rough estimate of reference()'s time on one core (fitted to measurements: about 1 s for
    T = 1000, N = 16; 5-20 s for T = 1000, N = 128, two sequences of 1000; 0.01-0.3 s for
    T <= 100). Only its order matters: it steers the default tier to cheap references."""
    sequences = 0.5 if packed else 2.0  # packed: one batch row cut into three sequences
    return (T / 1000) ** 1.3 * (0.4 + sequences * N * N / 6000) * (1.4 if op == "wkv7" else 1.0)


def pairwise_cover(axes: dict[str, list], cost_of_key, key_of) -> list[int]:
    """Indices (into the cartesian product of axes, in itertools.product order) of cases that
    together hold every pair of values of any two axes. Greedy: each step takes the case that
    covers the most new pairs per second, a case costing its reference's cost_of_key(key) unless
    an earlier pick already paid for that key (ties: the first in product order)."""
    sizes = [len(v) for v in axes.values()]
    index = np.array(list(itertools.product(*[range(n) for n in sizes])))  # (cases, axes)
    pair_ids, offset = [], 0
    for i, j in itertools.combinations(range(len(sizes)), 2):
        pair_ids.append(offset + index[:, i] * sizes[j] + index[:, j])
        offset += sizes[i] * sizes[j]
    pair_ids = np.stack(pair_ids, axis=1)  # (cases, pairs of axes): which pair of values
    keys = [key_of(dict(zip(axes, case, strict=True))) for case in itertools.product(*axes.values())]
    key_number = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    case_key = np.array([key_number[k] for k in keys])
    key_cost = np.array([cost_of_key(*k) for k in key_number])
    paid = np.zeros(len(key_number), dtype=bool)
    covered = np.zeros(offset, dtype=bool)
    chosen = []
    while not covered.all():
        gain = (~covered[pair_ids]).sum(axis=1)
        seconds = 1e-3 + np.where(paid[case_key], 0.0, key_cost[case_key])  # 1 ms: the case's own
        best = int(np.argmax(gain / seconds))
        chosen.append(best)
        covered[pair_ids[best]] = True
        paid[case_key[best]] = True
    return chosen


@functools.cache
def grid_tiers() -> tuple[list[tuple], frozenset[int], frozenset[int]]:
    """The full grid's cases (tuples in GRID_AXES order, itertools.product order), and the
    indices of the default tier's covering set and of its seeded sample."""
    cases = list(itertools.product(*GRID_AXES.values()))
    cover = pairwise_cover(GRID_AXES, reference_seconds, reference_key)
    computed = {reference_key(dict(zip(GRID_AXES, cases[i], strict=True))) for i in cover}
    chosen = set(cover)
    rest = []
    for i, case in enumerate(cases):
        key = reference_key(dict(zip(GRID_AXES, case, strict=True)))
        if i not in chosen and (key in computed or reference_seconds(*key) < CHEAP_REFERENCE_S):
            rest.append(i)
    sample = random.Random(GRID_SEED).sample(rest, min(GRID_SAMPLE, len(rest)))
    return cases, frozenset(cover), frozenset(sample)


def default_reference_keys() -> set[tuple]:
    """The references the default tier of the grid computes (and caches)."""
    cases, cover, sample = grid_tiers()
    return {reference_key(dict(zip(GRID_AXES, cases[i], strict=True))) for i in cover | sample}


def case_id(op, N, T, with_state, packed, *rest) -> str:
    return "-".join([op, *map(str, rest[:1]), str(N), str(T), "initial_state" if with_state else "zero_state",
                     "cu_seqlens" if packed else "batch", *map(str, rest[1:])])


def grid_params() -> list:
    """The whole grid as pytest params (op, dtype, N, T, with_state, packed, grads_from,
    cpu_algorithm), those outside the default tier marked slow."""
    cases, cover, sample = grid_tiers()
    params = []
    for i, (op, dtype, N, T, with_state, packed, grads_from, algorithm) in enumerate(cases):
        params.append(pytest.param(
            op, dtype, N, T, with_state, packed, grads_from, algorithm,
            id=case_id(op, N, T, with_state, packed, dtype, grads_from, algorithm),
            marks=() if i in cover or i in sample else SLOW))
    return params


def reference_params() -> list:
    """Every reference of the grid as pytest params (op, N, T, with_state, packed), those the
    default tier does not compute marked slow (so a test over the references, run in the same
    session as the grid, reuses the cached ones)."""
    default = default_reference_keys()
    keys = itertools.product(OP_NAMES, HEAD_SIZES, LENGTHS, [False, True], [False, True])
    return [pytest.param(*key, id=case_id(*key), marks=() if key in default else SLOW) for key in keys]


# ---------------------------------------------------------------------------------------------
# Tiny teachers

VOCAB = 101


def tiny_teacher(family: str = "qwen2", tie: bool = True, seed: int = 0, *, vocab: int = VOCAB,
                 hidden: int = 128, intermediate: int = 192, layers: int = 3, **config):
    """A random teacher (eval mode) of a transformers family, 4 attention heads over 2 key/value
    heads; config adds to (or overrides) its config's arguments."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=tie, **config)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    if family == "qwen3":  # head_dim 64 x 4 heads = 256 != hidden 128
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=64)).eval()
    raise ValueError(family)


# ---------------------------------------------------------------------------------------------
# A tiny distillation run: word tokenizer, Markov data, teacher and student on disk


def vocabulary(n_words: int = 59) -> list[str]:
    """The special tokens, then the words w0 ... w{n_words - 1}."""
    return ["<eos>", "<unk>", "<user>", "<assistant>", "<system>"] + [f"w{i}" for i in range(n_words)]


WORDS = vocabulary()
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def word_tokenizer(words: list[str] = WORDS):
    """A whitespace word-level fast tokenizer over words (id = position), with CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
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


def chat_record(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def make_run_inputs(
    root: Path, layers: int = 2, hidden: int = 64, docs: int = 48, seed: int = 0
) -> dict[str, Path]:
    """root/teacher, root/student (converted, fp32), root/hybrid (the same with layer 0's
    attention kept; the teacher has 2 layers by default), root/text.jsonl, root/chat.jsonl,
    root/prefs.jsonl (preference pairs: the chain's next word chosen, a random word rejected)."""
    from arwkv.conversion.convert import convert_checkpoint

    teacher = tiny_teacher(seed=seed, vocab=len(WORDS), hidden=hidden, intermediate=2 * hidden,
                           layers=layers, eos_token_id=0, max_position_embeddings=512)
    teacher.save_pretrained(root / "teacher")
    word_tokenizer().save_pretrained(root / "teacher")
    convert_checkpoint(root / "teacher", root / "student", head_size=16, dtype="fp32")
    # a hybrid: layer 0 keeps the teacher's attention, so layer 1 is the first time mixer
    convert_checkpoint(root / "teacher", root / "hybrid", head_size=16, dtype="fp32", wkv_layers=[1])
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 40, (docs,), generator=g).tolist()
    with (root / "text.jsonl").open("w") as f:
        for n in lengths:
            f.write(json.dumps({"text": markov_text(g, n)}) + "\n")
    with (root / "chat.jsonl").open("w") as f:
        for n in lengths:
            f.write(json.dumps(chat_record(markov_text(g, max(n // 3, 2)), markov_text(g, n))) + "\n")
    with (root / "prefs.jsonl").open("w") as f:
        for n in lengths:
            prompt = markov_text(g, max(n // 3, 2))
            last = int(prompt.split()[-1][1:])
            chosen = f"w{(3 * last + 1) % 59} w{(9 * last + 4) % 59}"
            a, b = torch.randint(59, (2,), generator=g).tolist()
            rejected = f"w{a} w{b}"
            prompt_field = [{"role": "user", "content": prompt}] if n % 2 else prompt  # both forms
            f.write(json.dumps({"prompt": prompt_field, "chosen": chosen, "rejected": rejected}) + "\n")
    return {
        "teacher": root / "teacher",
        "student": root / "student",
        "hybrid": root / "hybrid",
        "text": root / "text.jsonl",
        "chat": root / "chat.jsonl",
        "prefs": root / "prefs.jsonl",
    }


# ---------------------------------------------------------------------------------------------
# Helpers only the tests use, copied from the product


def token_split(directory: Path, docs: list[list[int]], masks: list[list[int]] | None = None):
    """A token split holding ``docs`` (token ids; with ``masks``, stage 3's loss masks), written
    as arwkv tokenize writes one, opened for reading."""
    from arwkv.data.shards import SplitWriter, TokenSplit

    dtype = np.dtype(np.uint32)
    writer = SplitWriter(directory, dtype)
    for i, doc in enumerate(docs):
        mask = np.array(masks[i], dtype=np.uint8) if masks is not None else None
        writer.append(np.array(doc, dtype=np.int64), np.array([len(doc)]), mask)
    return TokenSplit(directory, writer.close(), dtype)


def time_mixer_parameters(student) -> list[torch.nn.Parameter]:
    """What stage 1 trains: the time mixers' parameters, nothing else (as arwkv.training.losses's)."""
    return [p for layer in student.model.layers if layer.is_wkv
            for p in layer.self_attn.time_mixer.parameters()]
