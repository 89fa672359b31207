"""The ``arwkv`` command."""

from __future__ import annotations

import argparse
import json
import sys


def _info(_: argparse.Namespace) -> int:
    """Prints what this installation was built for, which CPU code path it uses, and the GPU."""
    import torch

    import arwkv
    import arwkv_ext

    print(json.dumps({
        "arwkv": arwkv.__version__,
        "torch": torch.__version__,
        "build": arwkv_ext.build_info,
        "cpu_isa": arwkv_ext.cpu_isa(),
        "cpu_isas_supported": arwkv_ext.cpu_isas_supported(),
        "threads": torch.get_num_threads(),
        "gpu_kernels": [k for k in arwkv_ext.build_info["kernels"] if k != "cpu"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }, indent=2))
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Teacher checkpoint directory -> student checkpoint directory."""
    import time

    from .convert import convert_checkpoint

    start = time.perf_counter()
    out = convert_checkpoint(args.teacher, args.out, init=args.init, head_size=args.head_size, gate=args.gate,
                             group_norm=args.group_norm, keep_bias=not args.drop_bias, dtype=args.dtype,
                             overwrite=args.overwrite, max_shard_size=args.max_shard_size, seed=args.seed,
                             wkv=args.wkv, wkv_layers=args.wkv_layers)
    print(f"arwkv convert: wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Streams a continuation of --prompt from a student (or any causal LM) checkpoint."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype="auto").eval()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature or None, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out.shape[1] - ids.shape[1]
    seconds = time.perf_counter() - start
    print(f"\n[{new} tokens in {seconds:.2f} s: {new / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def _distill(args: argparse.Namespace) -> int:
    """One stage of distillation (or SFT), configured by flags and/or --config."""
    from .distill_config import config_from_args
    from .trainer import train

    train(config_from_args(args))
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Perplexity and tokens/s of a checkpoint on a dataset, and/or an lm-evaluation-harness task, as JSON."""
    from .evaluate import evaluate, lm_eval_task

    if not args.data and not args.lm_eval_task:
        raise ValueError("give --data (perplexity) and/or --lm-eval-task (an lm_eval task file)")
    report = {}
    if args.data:
        report = evaluate(args.model, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                          validation_fraction=args.validation_fraction, seed=args.seed,
                          max_tokens=args.max_tokens, device=args.device, dtype=args.dtype)
    if args.lm_eval_task:
        report["lm_eval"] = lm_eval_task(args.model, args.lm_eval_task, limit=args.limit, device=args.device,
                                         dtype=args.dtype)
    print(json.dumps(report, indent=2))  # one JSON object
    return 0


def _plot(args: argparse.Namespace) -> int:
    """RUN/loss.png from RUN/metrics.jsonl."""
    from .monitor import plot_run

    print(f"arwkv plot: wrote {plot_run(args.run_dir)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Convert the shipped teacher, distil it (stages 1-2), compare, report."""
    from .demo import DemoPlan, run_demo

    plan = DemoPlan.quick(args.init) if args.quick else DemoPlan(init=args.init)
    for name in ("stage1_steps", "stage2_steps"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    run_demo(args.out, plan)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arwkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="show the build, the CPU code path and the GPU").set_defaults(run=_info)

    convert = commands.add_parser("convert", help="turn a Transformer checkpoint into an ARWKV student")
    convert.add_argument("--teacher", required=True, help="Hugging Face checkpoint directory")
    convert.add_argument("--out", required=True, help="student checkpoint directory to write")
    convert.add_argument("--init", choices=["transfer", "fresh"], default="transfer",
                         help="transfer: r,k,v,o <- q,k,v,o of the teacher (default); fresh: ARWKV's init")
    convert.add_argument("--wkv", type=int, choices=[7, 6], default=7, help="time mixing: RWKV-7 or RWKV-6")
    convert.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    convert.add_argument("--wkv-layers", type=lambda t: [int(x) for x in t.split(",") if x.strip()],
                         help="comma-separated layers that get time mixing (default: all); the others "
                         "keep the teacher's attention")
    convert.add_argument("--head-size", type=int, default=64, choices=[16, 32, 64, 128])
    convert.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True, help="output gate")
    convert.add_argument("--group-norm", action="store_true", help="per-head GroupNorm of the WKV output")
    convert.add_argument("--drop-bias", action="store_true", help="do not keep the teacher's q/k/v biases")
    convert.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (e.g. 500MB)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the time mixers' random initial values")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    convert.set_defaults(run=_convert)

    generate = commands.add_parser("generate", help="stream a continuation of a prompt and print tokens/s")
    generate.add_argument("--model", required=True, help="checkpoint directory")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.set_defaults(run=_generate)

    from .distill_config import add_arguments

    distill = commands.add_parser("distill", help="train a student: stage 1, 2 or 3",
                                  description="Flags and --config keys are the same (a flag wins). Under "
                                  "torchrun the same command trains on every process.")
    add_arguments(distill)
    distill.set_defaults(run=_distill)

    evaluate = commands.add_parser("eval", help="perplexity and tokens/s of a checkpoint on a dataset")
    evaluate.add_argument("--model", required=True, help="checkpoint directory (student or teacher)")
    evaluate.add_argument("--data", help="same formats as arwkv distill --data")
    evaluate.add_argument("--lm-eval-task", metavar="YAML",
                          help="also score with lm-evaluation-harness (hf backend) on this local task file")
    evaluate.add_argument("--limit", type=int, help="lm_eval: at most this many documents")
    evaluate.add_argument("--seq-len", type=int, default=512, help="tokens per scored window")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--validation-fraction", type=float, default=0.0,
                          help="score only the validation split that arwkv distill makes with this "
                          "fraction and --seed")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--max-tokens", type=int, help="stop after about this many tokens")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    evaluate.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    evaluate.set_defaults(run=_eval)

    plot = commands.add_parser("plot", help="draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir")
    plot.set_defaults(run=_plot)

    demo = commands.add_parser("demo", help="distil the shipped Qwen2 teacher on this CPU, report")
    demo.add_argument("--out", default="arwkv-demo", help="for the students, runs, report")
    demo.add_argument("--init", choices=["transfer", "fresh"], default="transfer",
                      help="student initialisation")
    demo.add_argument("--stage1-steps", type=int)
    demo.add_argument("--stage2-steps", type=int)
    demo.add_argument("--quick", action="store_true", help="a few steps of everything (CI)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ImportError, RuntimeError, ValueError, OSError) as err:
        print(f"arwkv {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
