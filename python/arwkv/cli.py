"""arwkv converts a pretrained Transformer LLM (a Hugging Face decoder such as Qwen2, Llama or
Mistral) into an RNN-attention student, whose self-attentions are RWKV-7 (or RWKV-6) time mixers
with the teacher's MLPs, embeddings and norms, and distils the student from its teacher: stage 1
aligns each time mixer with its layer's attention, stage 2 distils the logits, stage 3 is SFT,
stage 4 is DPO on preference pairs.

commands:
  convert   teacher checkpoint directory -> student checkpoint directory
  distill   train a student: stage 1, 2, 3 or 4 (one process, or many under torchrun)
  hybridize a student -> a hybrid that keeps the teacher's attention where time mixing does worst
  eval      perplexity, tokens/s and cache bytes on a dataset, long-context curves and passkey
            retrieval, or an lm-evaluation-harness task
  generate  stream a continuation of a prompt
  export    a student as a GGUF file that llama.cpp runs (its arwkv7 architecture)
  plot      draw a run's loss curves
  demo      all of it on the shipped small Qwen2 teacher, on this CPU (or --device cuda), in minutes
  info      the build, the CPU code path and the GPU

Run `arwkv COMMAND --help` for a command's options.
"""

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
                             group_norm=args.group_norm, keep_bias=args.keep_bias, dtype=args.dtype,
                             overwrite=args.overwrite, max_shard_size=args.max_shard_size, seed=args.seed,
                             wkv=args.wkv, wkv_layers=args.wkv_layers)
    if args.keep_bias:
        print("arwkv convert: note: the student keeps the teacher's q/k/v biases; such a checkpoint runs "
              "only in arwkv (the published ARWKV code and llama.cpp have no place for them)")
    print(f"arwkv convert: wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Streams a continuation of --prompt from a student (or any causal LM) checkpoint."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from .distill_config import check_checkpoint_dir

    check_checkpoint_dir(args.model, "--model")  # not a Hub repository name: a directory
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
    """Perplexity, tokens/s and cache memory of a checkpoint on a dataset, and/or an
    lm-evaluation-harness task, as JSON; or (--long-context) loss by position and passkey retrieval
    of one or more checkpoints, as JSON and OUT/long_context.{json,png}."""
    from .evaluate import evaluate, lm_eval_task

    # the flags only --long-context reads (None unless given), and those it does not read
    long_only = {"out": "--out", "max_len": "--max-len", "buckets": "--buckets",
                 "bucket_spacing": "--bucket-spacing", "max_sequences": "--max-sequences",
                 "passkey_lengths": "--passkey-lengths", "passkey_depths": "--passkey-depths",
                 "passkey_trials": "--passkey-trials"}
    not_long = {"lm_eval_task": "--lm-eval-task", "limit": "--limit", "seq_len": "--seq-len (see --max-len)",
                "max_tokens": "--max-tokens (see --max-sequences)"}
    if args.long_context:
        from .long_context import (
            LongContextSettings,
            evaluate_long_context,
            parse_buckets,
            parse_fractions,
            parse_ints,
        )

        if not args.out:
            raise ValueError("--long-context needs --out DIR (for long_context.json and long_context.png)")
        stray = [flag for name, flag in not_long.items() if getattr(args, name) is not None]
        if stray:
            raise ValueError(f"--long-context does not read {', '.join(stray)}")
        given = {
            "max_len": args.max_len,
            "buckets": None if args.buckets is None else parse_buckets(args.buckets),
            "bucket_spacing": args.bucket_spacing,
            "max_sequences": args.max_sequences,
            "passkey_lengths": None if args.passkey_lengths is None
            else parse_ints(args.passkey_lengths, "--passkey-lengths"),
            "passkey_depths": None if args.passkey_depths is None
            else parse_fractions(args.passkey_depths, "--passkey-depths"),
            "passkey_trials": args.passkey_trials,
            "batch_size": args.batch_size,
        }
        settings = LongContextSettings(
            data=args.data, validation_fraction=args.validation_fraction, seed=args.seed, device=args.device,
            dtype=args.dtype, **{k: v for k, v in given.items() if v is not None})

        def log(line: str) -> None:
            print(f"arwkv eval: {line}", file=sys.stderr, flush=True)

        report = evaluate_long_context(args.model, args.out, settings, log=log)
        print(json.dumps(report, indent=2))  # one JSON object, as OUT/long_context.json holds it
        return 0
    stray = [flag for name, flag in long_only.items() if getattr(args, name) is not None]
    if stray:
        raise ValueError(f"{', '.join(stray)}: only with --long-context")
    if len(args.model) > 1:
        raise ValueError(f"--model: {len(args.model)} directories given; one, unless --long-context "
                         "(which compares several)")
    model = args.model[0]
    if not args.data and not args.lm_eval_task:
        raise ValueError("give --data (perplexity) and/or --lm-eval-task (an lm_eval task file)")
    report = {}
    if args.data:
        report = evaluate(model, args.data, seq_len=512 if args.seq_len is None else args.seq_len,
                          batch_size=8 if args.batch_size is None else args.batch_size,
                          validation_fraction=args.validation_fraction, seed=args.seed,
                          max_tokens=args.max_tokens, device=args.device, dtype=args.dtype)
    if args.lm_eval_task:
        report["lm_eval"] = lm_eval_task(model, args.lm_eval_task, limit=args.limit, device=args.device,
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
    plan.device = args.device
    plan.keep_bias = args.keep_bias
    plan.head_size = args.head_size
    plan.gguf = args.gguf
    for name in ("stage1_steps", "stage2_steps"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    run_demo(args.out, plan)
    return 0


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends every option's help with its default (or "(required)"), unless the help already
    says it (argparse.ArgumentDefaultsHelpFormatter would add a second one, and "None").
    The benchmarks' scripts use it too."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "(default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)"
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


class RawDescriptionDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """DefaultsHelpFormatter that keeps the line breaks of the top-level description (its command list)."""


def _head_size_choices() -> list[int] | None:
    """The head sizes the compiled kernels run (arwkv_ext.HEAD_SIZES); None when the kernels
    cannot be imported, so that --help still works (the student's config then refuses)."""
    from .runtime import head_sizes

    try:
        return list(head_sizes())
    except (ImportError, AttributeError):
        return None


def _add_command(commands: argparse._SubParsersAction, name: str, help_: str, run,
                 description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help shows ``help_`` (or the longer ``description``) and every default."""
    parser = commands.add_parser(name, help=help_, formatter_class=DefaultsHelpFormatter,
                                 description=description or help_[0].upper() + help_[1:] + ".")
    parser.set_defaults(run=run)
    return parser


def _export(args: argparse.Namespace) -> int:
    """A student checkpoint directory -> a GGUF file of llama.cpp's arwkv7 architecture."""
    from .gguf_export import export_gguf

    report = export_gguf(args.model, args.gguf, outtype=args.outtype, overwrite=args.overwrite)
    for warning in report.warnings:
        print(f"arwkv export: warning: {warning}", file=sys.stderr)
    print(f"arwkv export: wrote {report.path} ({report.tensors} tensors, {report.outtype})")
    return 0


def _hybridize(args: argparse.Namespace) -> int:
    """A student -> a hybrid that keeps the teacher's attention where the student does worst."""
    import time
    from pathlib import Path

    from .hybridize import hybridize, render_scores

    start = time.perf_counter()
    student = args.student
    if student is None:  # a stage-1 run's own student by default
        if args.run_dir is None:
            raise ValueError("give --student DIR (or --run RUN_DIR, whose RUN_DIR/student is the default)")
        student = str(Path(args.run_dir) / "student")
    result = hybridize(args.teacher, student, args.out, keep=args.keep, layers=args.layers, run=args.run_dir,
                       data=args.data, rows=args.rows, seq_len=args.seq_len, batch_size=args.batch_size,
                       validation_fraction=args.validation_fraction, seed=args.seed, loss=args.loss,
                       device=args.device, pick=args.pick, score=args.score, overwrite=args.overwrite)
    print(render_scores(result.report))
    print(f"arwkv hybridize: wrote {result.path} in {time.perf_counter() - start:.1f} s "
          "(next: arwkv distill --stage 2 re-tunes the hybrid)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``arwkv`` command line: one subcommand per job."""
    from .demo import DemoPlan
    from .distill_config import add_arguments
    from .runtime import DEVICES, DTYPES

    parser = argparse.ArgumentParser(prog="arwkv", description=__doc__,
                                     formatter_class=RawDescriptionDefaultsFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_command(commands, "info", "show the build, the CPU code path and the GPU", _info)

    convert = _add_command(commands, "convert", "turn a Transformer checkpoint into an ARWKV student",
                           _convert)
    convert.add_argument("--teacher", required=True, metavar="DIR",
                         help="Hugging Face checkpoint directory (safetensors) of the teacher")
    convert.add_argument("--out", required=True, metavar="DIR", help="student checkpoint directory to write")
    convert.add_argument("--init", choices=["transfer", "fresh"], default="transfer",
                         help="transfer: r,k,v,o <- q,k,v,o of the teacher; fresh: ARWKV's init")
    convert.add_argument("--wkv", type=int, choices=[7, 6], default=7, help="time mixing: RWKV-7 or RWKV-6")
    convert.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                         help="dtype of the written weights; auto: the teacher's own, so its weights "
                         "are copied bit for bit")
    convert.add_argument("--wkv-layers", type=lambda t: [int(x) for x in t.split(",") if x.strip()],
                         metavar="I,J,...", help="comma-separated layers that get time mixing "
                         "(default: all); the others keep the teacher's attention")
    convert.add_argument("--head-size", type=int, default=64, choices=_head_size_choices(),
                         help="WKV head size N (the heads are attention width / N)")
    convert.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True, help="output gate")
    convert.add_argument("--group-norm", action="store_true", help="per-head GroupNorm of the WKV output")
    bias = convert.add_mutually_exclusive_group()
    bias.add_argument("--keep-bias", action="store_true",
                      help="keep the teacher's q/k/v biases on receptance/key/value (runs only in arwkv; "
                      "the published ARWKV layout and llama.cpp have none)")
    bias.add_argument("--drop-bias", action="store_true",
                      help="the default now (biases are dropped unless --keep-bias); for old scripts")
    convert.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (e.g. 500MB)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the time mixers' random initial values")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    generate = _add_command(commands, "generate", "stream a continuation of a prompt and print tokens/s",
                            _generate)
    generate.add_argument("--model", required=True, metavar="DIR",
                          help="checkpoint directory (a student, or any causal LM)")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    generate.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")

    distill = _add_command(commands, "distill", "train a student: stage 1, 2, 3 or 4", _distill,
                           description="Train a student: stage 1 (attention alignment), 2 (logit "
                           "distillation), 3 (SFT) or 4 (DPO). Flags and --config keys are the same (a flag "
                           "wins). Under torchrun the same command trains on every process.")
    add_arguments(distill)

    from .long_context import SPACINGS, LongContextSettings

    long_context = LongContextSettings()
    evaluate = _add_command(commands, "eval", "perplexity, speed, cache bytes; long-context curves", _eval,
                            description="Perplexity, tokens/s and cache memory (bytes constant and per "
                            "token of context) of a checkpoint on a dataset (--data), and/or its "
                            "lm-evaluation-harness scores on a local task file, as one JSON object. With "
                            "--long-context: loss by position (--data) and passkey retrieval of one or more "
                            "checkpoints (teacher and student side by side), as one JSON object, also "
                            "written to OUT/long_context.json with the figure OUT/long_context.png.")
    evaluate.add_argument("--model", required=True, metavar="DIR", nargs="+", action="extend",
                          help="checkpoint directory (student or teacher); several only with --long-context")
    evaluate.add_argument("--data", help="same formats as arwkv distill --data")
    evaluate.add_argument("--lm-eval-task", metavar="YAML",
                          help="also score with lm-evaluation-harness (hf backend) on this local task file")
    evaluate.add_argument("--limit", type=int, help="lm_eval: at most this many documents (default: all)")
    evaluate.add_argument("--seq-len", type=int, help="tokens per scored window (default: 512)")
    evaluate.add_argument("--batch-size", type=int,
                          help="windows per forward (default: 8; with --long-context sequences or passkey "
                          f"prompts per forward, default {long_context.batch_size})")
    evaluate.add_argument("--validation-fraction", type=float, default=0.0,
                          help="score only the validation split that arwkv distill makes with this "
                          "fraction and --seed (0: all of --data)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the validation split and the passkeys")
    evaluate.add_argument("--max-tokens", type=int, help="stop after about this many tokens (default: all)")
    evaluate.add_argument("--device", choices=DEVICES, default="auto", help="auto: the GPU when there is one")
    evaluate.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype the model runs in")
    evaluate.add_argument("--long-context", action="store_true",
                          help="loss by position and passkey retrieval instead of perplexity (needs --out)")
    evaluate.add_argument("--out", metavar="DIR", help="--long-context: where long_context.json and "
                          "long_context.png go (default: none; required with --long-context)")
    evaluate.add_argument("--max-len", type=int, metavar="TOKENS",
                          help=f"--long-context: sequence length scored by position, and the longest passkey "
                          f"prompt (default: {long_context.max_len})")
    evaluate.add_argument("--buckets", metavar="N|E0,E1,...",
                          help="--long-context: N position buckets from 1 to --max-len, or their edges "
                          f"(bucket i is positions [Ei, Ei+1)) (default: {long_context.buckets})")
    evaluate.add_argument("--bucket-spacing", choices=SPACINGS,
                          help="--long-context: spacing of N buckets "
                          f"(default: {long_context.bucket_spacing})")
    evaluate.add_argument("--max-sequences", type=int, metavar="N",
                          help="--long-context: score at most the first N sequences of --data (default: all)")
    evaluate.add_argument("--passkey-lengths", metavar="L1,L2,...",
                          help="--long-context: total passkey prompt lengths in tokens (default: powers of "
                          "two from 256 up to --max-len, and --max-len)")
    evaluate.add_argument("--passkey-depths", metavar="D1,D2,...",
                          help="--long-context: key depths, the fraction of the filler before the key, in "
                          f"[0, 1] (default: {','.join(f'{d:g}' for d in long_context.passkey_depths)})")
    evaluate.add_argument("--passkey-trials", type=int, metavar="N",
                          help="--long-context: random keys per (length, depth), from --seed; 0: no passkey "
                          f"retrieval (default: {long_context.passkey_trials})")

    export = _add_command(commands, "export", "write a student as a GGUF file for llama.cpp", _export,
                          description="Write a student as a GGUF file of llama.cpp's arwkv7 architecture "
                          "(RWKV-7 time mixing, Qwen2-style MLP), tokenizer included. Refuses, in one line, "
                          "what llama.cpp cannot run: RWKV-6 students, hybrids, biases, an attention width "
                          "other than the hidden size, tokenizers other than Qwen2-style byte-level BPE.")
    export.add_argument("--model", required=True, metavar="DIR", help="student checkpoint directory")
    export.add_argument("--gguf", required=True, metavar="OUT.gguf", help="GGUF file to write")
    export.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                        help="type of the large matrices (norms, vectors and the time mixers' low-rank "
                        "matrices stay f32)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")

    hybrid = _add_command(commands, "hybridize",
                          "restore the teacher's attention where the student does worst", _hybridize,
                          description="Give the teacher's attention back to the K time-mixing layers "
                          "that score worst (--pick best: the K best), and write the result as a new student "
                          "checkpoint (a hybrid) with OUT/hybridize.json. --score alignment: stage 1's "
                          "per-layer alignment loss, from a stage-1 run's held-out losses (--run) or "
                          "measured on --data; --score restore: the drop of the student's KL to the teacher "
                          "when only that layer gets attention back, measured on --data. --layers names the "
                          "layers by hand. Stage 2 afterwards re-tunes the hybrid.")
    hybrid.add_argument("--teacher", required=True, metavar="DIR", help="the student's teacher checkpoint")
    hybrid.add_argument("--student", metavar="DIR",
                        help="student checkpoint directory (default: RUN_DIR/student with --run)")
    hybrid.add_argument("--out", required=True, metavar="DIR", help="hybrid checkpoint directory to write")
    hybrid.add_argument("--keep", type=int, metavar="K", help="time-mixing layers that get attention back")
    hybrid.add_argument("--layers", type=lambda t: [int(x) for x in t.split(",") if x.strip()],
                        metavar="I,J,...", help="instead of --keep: these layers get attention back")
    hybrid.add_argument("--pick", choices=["worst", "best"], default="worst",
                        help="worst: the K layers with the highest alignment loss; best: the K lowest "
                        "(an ablation)")
    hybrid.add_argument("--score", choices=["alignment", "restore"],
                        help="what judges a layer. alignment: its stage-1 alignment loss (from --run, or "
                        "measured on --data); restore: measured on --data, how much the student's KL to the "
                        "teacher drops when only that layer gets attention back (end to end; one forward "
                        "per layer; it chose better on the demo: benchmarks/results/hybrid-layers.md) "
                        "(default: alignment with --run, restore with --data)")
    hybrid.add_argument("--run", metavar="RUN_DIR", dest="run_dir",  # args.run is the command's function
                        help="scores: the latest held-out val_layer_* of a stage-1 run (made with "
                        "--validation-fraction)")
    hybrid.add_argument("--data", help="scores: measured on this text (same formats as arwkv distill --data)")
    hybrid.add_argument("--rows", type=int, default=64, help="--data: packed rows to measure on")
    hybrid.add_argument("--seq-len", type=int, default=512, help="--data: tokens per row")
    hybrid.add_argument("--batch-size", type=int, default=8, help="--data: rows per forward")
    hybrid.add_argument("--validation-fraction", type=float, default=0.0,
                        help="--data: measure on the validation split arwkv distill makes with this fraction "
                        "and --seed (0: all of --data)")
    hybrid.add_argument("--seed", type=int, default=0, help="--data: packing order and split")
    hybrid.add_argument("--loss", choices=["rms", "mse"], default="rms",
                        help="--data with --score alignment: stage 1's loss")
    hybrid.add_argument("--device", choices=DEVICES, default="auto",
                        help="--data: where the measurement runs")
    hybrid.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    plot = _add_command(commands, "plot", "draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl", _plot)
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of arwkv distill (its --out)")

    demo = _add_command(commands, "demo", "distil the shipped Qwen2 teacher on this CPU, report", _demo,
                        description="Convert the shipped small Qwen2 teacher into an RWKV-7 student, distil "
                        "it (stages 1 and 2) on this CPU (or the --device given), compare perplexity, "
                        "decoding speed, cache memory and loss by position on long held-out sequences, "
                        "and write OUT/report.md with OUT/long_context.png (a few minutes, no download).")
    demo.add_argument("--out", default="arwkv-demo", metavar="DIR", help="for the students, runs, report")
    demo.add_argument("--init", choices=["transfer", "fresh"], default="transfer",
                      help="student initialisation")
    full, quick = DemoPlan(), DemoPlan.quick()
    for stage in (1, 2):
        name = f"stage{stage}_steps"
        demo.add_argument(f"--stage{stage}-steps", type=int, metavar="N",
                          help=f"stage {stage} steps (default: {getattr(full, name)}; "
                          f"{getattr(quick, name)} with --quick)")
    demo.add_argument("--keep-bias", action="store_true",
                      help="the student keeps the teacher's q/k/v biases (as arwkv convert --keep-bias)")
    demo.add_argument("--head-size", type=int, default=DemoPlan.head_size, choices=_head_size_choices(),
                      help="the student's WKV head size (llama.cpp runs 64 and 128 correctly)")
    demo.add_argument("--gguf", action="store_true",
                      help="also write the distilled student as OUT/student.gguf (f16) for llama.cpp")
    demo.add_argument("--quick", action="store_true", help="a few steps of everything (CI)")
    demo.add_argument("--device", choices=DEVICES, default="cpu",
                      help="where training, scoring and decoding run. cpu by default: the published "
                      "numbers and the step counts are the CPU story; cuda (or auto on a GPU machine) "
                      "runs the same pipeline on the GPU as a smoke test, training under bf16 autocast")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a refusal or failure is one line on stderr, ``arwkv COMMAND: ...``, and
    exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ImportError, RuntimeError, ValueError, OSError) as err:
        print(f"arwkv {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
