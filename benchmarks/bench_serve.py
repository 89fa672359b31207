"""Serving speed and cache memory of a student, a hybrid and their teacher under vLLM.

For each model (the teacher: vLLM's own Qwen2; its RWKV-7 student and a hybrid keeping attention
in half its layers, both served through arwkv's plugin), each context length and each number of
concurrent requests: every request's prompt is that many random tokens, all are submitted at once
and each generates ``--new-tokens`` tokens (EOS ignored). Reported: generated tokens/s over the
whole run (prefill included), the mean time to the first token, and the cache bytes one sequence
holds at that context, read from the engine's own cache tensors (a time-mixing layer's state slot:
its token-shift vector and WKV state; an attention layer's key/value pages, per token).

The models are random-weight checkpoints of a given shape (speed and memory do not depend on the
values): ``--shape demo`` is the shipped demo teacher's (4 layers, width 192, vocabulary 2048),
``--shape qwen2.5-0.5b`` Qwen2.5-0.5B's (24 layers, width 896, vocabulary 151936; slow on 2 cores).

    python benchmarks/bench_serve.py                       # demo shape, 256 and 2048 tokens, 1 and 8
    python benchmarks/bench_serve.py --shape qwen2.5-0.5b --contexts 256 --concurrency 1

Writes a Markdown table and JSON under benchmarks/results/ (``--out``). Needs vLLM (make bench-serve).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of cache: 8 x 2048 tokens fit easily
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "python" / "arwkv" / "demo_assets" / "teacher"
SHAPES = {
    "demo": None,  # the demo teacher's own config
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, tie_word_embeddings=True),
}


def make_models(shape: str, root: Path) -> dict[str, Path]:
    """teacher, student (RWKV-7, every layer) and hybrid (attention kept in the even layers)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from arwkv.conversion.convert import convert_checkpoint

    if SHAPES[shape] is None:
        teacher = DEMO_TEACHER
    else:
        teacher = root / "teacher"
        config = Qwen2Config(**SHAPES[shape], rope_theta=1e6, rms_norm_eps=1e-6, dtype="bfloat16")
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(teacher)
    layers = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    return {
        "teacher": teacher,
        "student": convert_checkpoint(teacher, root / "student"),
        "hybrid": convert_checkpoint(teacher, root / "hybrid", wkv_layers=list(range(1, layers, 2))),
    }


def measure(model: Path, contexts: list[int], concurrency: list[int], new_tokens: int, dtype: str,
            vocab: int) -> list[dict]:
    import torch
    from vllm import LLM, SamplingParams

    longest = max(contexts) + new_tokens
    start = time.perf_counter()
    llm = LLM(model=str(model), dtype=dtype, max_model_len=longest, max_num_seqs=max(concurrency),
              max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0, skip_tokenizer_init=True,
              disable_log_stats=False)  # the per-request times to the first token
    start_s = time.perf_counter() - start
    # vLLM pickles the function by name: this module's, not __main__'s (which its processes lack)
    import bench_serve

    memory = llm.apply_model(bench_serve.cache_bytes)[0]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    llm.generate([{"prompt_token_ids": [5] * 16}], params, use_tqdm=False)  # warm-up
    rows = []
    for context in contexts:
        for n in concurrency:
            prompts = [{"prompt_token_ids": torch.randint(5, vocab, (context,), generator=g).tolist()}
                       for _ in range(n)]
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            generated = sum(len(o.outputs[0].token_ids) for o in outputs)
            firsts = [o.metrics.first_token_latency for o in outputs
                      if o.metrics is not None and getattr(o.metrics, "first_token_latency", None)]
            held = memory["constant"] + memory["per_token"] * (context + new_tokens)
            rows.append({"context": context, "concurrent": n, "generated": generated, "seconds": seconds,
                         "tokens_per_s": generated / seconds,
                         "first_token_s": statistics.mean(firsts) if firsts else None,
                         "cache_bytes_per_sequence": held})
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return rows, start_s, memory


def cache_bytes(model) -> dict:
    """Runs in vLLM's worker: the bytes one sequence holds in the model's caches: constant (each
    time-mixing layer's state slot: token shift + WKV state) and per token of context (each
    attention layer's keys and values: its cache tensors' bytes over the tokens they hold)."""
    from arwkv.serving.vllm_model import TimeMixing

    constant = per_token = 0
    for layer in model.modules():
        if isinstance(layer, TimeMixing):
            constant += sum(state[0].numel() * state.element_size() for state in layer.kv_cache)
        elif type(layer).__name__ == "Attention" and hasattr(layer, "kv_cache"):
            cache = layer.kv_cache
            tensors = cache if isinstance(cache, (list, tuple)) else [cache]
            tokens = sum(t.numel() for t in tensors) // (2 * layer.num_kv_heads * layer.head_size)
            per_token += sum(t.numel() * t.element_size() for t in tensors) // tokens
    return {"constant": constant, "per_token": per_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--models", nargs="+", default=["teacher", "student", "hybrid"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve-cpu-2core")
    args = parser.parse_args()

    import torch
    import vllm

    results = {"shape": args.shape, "dtype": args.dtype, "new_tokens": args.new_tokens,
               "vllm": vllm.__version__, "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(args.shape, Path(tmp))
        vocab = json.loads((models["teacher"] / "config.json").read_text())["vocab_size"]
        for name in args.models:
            rows, start_s, memory = measure(models[name], args.contexts, args.concurrency, args.new_tokens,
                                            args.dtype, vocab)
            results["models"][name] = {"engine_start_s": start_s, "cache": memory, "runs": rows}
            for r in rows:
                print(f"{name:8s} context {r['context']:5d} x{r['concurrent']}: "
                      f"{r['tokens_per_s']:8.1f} tokens/s, cache {r['cache_bytes_per_sequence']:,} B/seq",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")  # (with_suffix would eat ".5b")
    Path(f"{args.out}.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    lines = [f"vLLM {results['vllm']} (CPU build, its default threading), torch {results['torch']}, "
             f"{results['cores']} cores, "
             f"{results['dtype']}, shape {results['shape']}, {results['new_tokens']} generated tokens a "
             "request (prompt: random tokens; all requests submitted at once)", "",
             "| model | context | concurrent | tokens/s | mean first token (s) | cache bytes / sequence |",
             "|---|---|---|---|---|---|"]
    for name, model in results["models"].items():
        for r in model["runs"]:
            first = f"{r['first_token_s']:.2f}" if r["first_token_s"] is not None else "-"
            lines.append(f"| {name} | {r['context']} | {r['concurrent']} | {r['tokens_per_s']:.1f} | "
                         f"{first} | {r['cache_bytes_per_sequence']:,} |")
    lines.append("")
    for name, model in results["models"].items():
        c = model["cache"]
        lines.append(f"- {name}: {c['constant']:,} B of recurrent state per sequence (constant), "
                     f"{c['per_token']:,} B of keys/values per token of context; engine start "
                     f"{model['engine_start_s']:.0f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
