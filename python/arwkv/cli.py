"""arwkv converts a pretrained Transformer LLM (a Hugging Face decoder such as Qwen2, Llama or
Mistral) into an RNN-attention student, whose self-attentions are RWKV-7 (or RWKV-6) time mixers
with the teacher's MLPs, embeddings and norms, and distils the student from its teacher: stage 1
aligns each time mixer with its layer's attention, stage 2 distils the logits, stage 3 is SFT,
stage 4 is DPO on preference pairs.

Every command's flags can also come from --config FILE (.yaml or .toml; keys are the flags'
names). Run `arwkv COMMAND --help` for a command's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import options as o

# ----------------------------------------------------------------------------- the commands
# Each takes its options dataclass (options.py) and returns the exit status. The heavy modules
# are imported inside, so that building the parser and --help stay fast.


def fields(opts: object, *leave_out: str) -> dict:
    """An options object's fields as keyword arguments of the library function that does the work
    (they share the names), less those passed on their own."""
    return {k: v for k, v in dataclasses.asdict(opts).items() if k not in leave_out}


def info(_: o.InfoOptions) -> int:
    """Prints what this installation was built for, which CPU code path it uses, and the GPU."""
    import torch

    import arwkv
    import arwkv_ext

    print(
        json.dumps(
            {
                "arwkv": arwkv.__version__,
                "torch": torch.__version__,
                "build": arwkv_ext.build_info,
                "cpu_isa": arwkv_ext.cpu_isa(),
                "cpu_isas_supported": arwkv_ext.cpu_isas_supported(),
                "head_sizes": list(arwkv_ext.HEAD_SIZES),
                "threads": torch.get_num_threads(),
                "gpu_kernels": [k for k in arwkv_ext.build_info["kernels"] if k != "cpu"],
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            },
            indent=2,
        )
    )
    return 0


def convert(opts: o.ConvertOptions) -> int:
    from .conversion.convert import convert_checkpoint

    start = time.perf_counter()
    out = convert_checkpoint(opts.teacher, opts.out, **fields(opts, "teacher", "out"))
    if opts.keep_bias and opts.wkv == 7:
        print(
            "arwkv convert: note: the student keeps the teacher's q/k/v biases; such an RWKV-7 checkpoint "
            "runs only in arwkv and vLLM (the published ARWKV code and llama.cpp's arwkv7 have no place "
            "for them)"
        )
    if opts.wkv == 6 and opts.wkv6_form == "finch":
        print(
            "arwkv convert: note: a finch RWKV-6 student runs in arwkv and vLLM; llama.cpp's rwkv6qwen2 "
            "computes the qrwkv form (the default --wkv6-form)"
        )
    print(f"arwkv convert: wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def tokenize(opts: o.TokenizeOptions) -> int:
    from .data.tokenize import tokenize_corpus

    tokenize_corpus(opts.data, opts.tokenizer, opts.out, **fields(opts, "data", "tokenizer", "out"),
                    log=lambda line: print(f"arwkv tokenize: {line}", file=sys.stderr, flush=True))
    return 0


def distill(cfg: o.DistillConfig) -> int:
    from .training.checkpoint import checkpoints
    from .training.trainer import train

    try:
        train(cfg)
    except KeyboardInterrupt:  # Ctrl-C: say how to go on (the run directory is consistent)
        found = checkpoints(Path(cfg.out))
        where = (f"from {found[-1]}" if found else
                 "from the start (no checkpoint yet: --save-every N writes one every N steps)")
        raise Interrupted(f"interrupted; the same command with --resume continues {where}") from None
    return 0


def hybridize(opts: o.HybridizeOptions) -> int:
    from .conversion.hybridize import hybridize, render_scores

    start = time.perf_counter()
    result = hybridize(opts.teacher, opts.student, opts.out, **fields(opts, "teacher", "student", "out"))
    print(render_scores(result.report))
    print(
        f"arwkv hybridize: wrote {result.path} in {time.perf_counter() - start:.1f} s "
        "(next: arwkv distill --stage 2 re-tunes the hybrid)"
    )
    return 0


def evaluate(opts: o.EvalOptions) -> int:
    from .evaluation.perplexity import evaluate, lm_eval_task

    report = {}
    if opts.data:
        report = evaluate(opts.model, opts.data, **fields(opts, "model", "data", "lm_eval_task", "limit"),
                          log=lambda line: print(f"arwkv eval: {line}", file=sys.stderr, flush=True))
    if opts.lm_eval_task:
        report["lm_eval"] = lm_eval_task(
            opts.model, opts.lm_eval_task, limit=opts.limit, device=opts.device, dtype=opts.dtype
        )
    print(json.dumps(report, indent=2))  # one JSON object
    return 0


def long_context(opts: o.LongContextOptions) -> int:
    from .evaluation.long_context import evaluate_long_context

    def log(line: str) -> None:
        print(f"arwkv long-context: {line}", file=sys.stderr, flush=True)

    report = evaluate_long_context(opts, log=log)
    print(json.dumps(report, indent=2))  # one JSON object, as OUT/long_context.json holds it
    return 0


def generate(opts: o.GenerateOptions) -> int:
    import torch
    from transformers import TextStreamer

    from .loading import load_causal_lm
    from .runtime import dtype_from_name, resolve_device

    device = resolve_device(opts.device)
    model, tokenizer = load_causal_lm(opts.model, device, dtype_from_name(opts.dtype))
    ids = tokenizer(opts.prompt, return_tensors="pt").input_ids.to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=opts.max_new_tokens,
            do_sample=opts.temperature > 0,
            temperature=opts.temperature or None,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    new = out.shape[1] - ids.shape[1]
    seconds = time.perf_counter() - start
    print(f"\n[{new} tokens in {seconds:.2f} s: {new / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def export(opts: o.ExportOptions) -> int:
    from .export.gguf import export_gguf

    report = export_gguf(opts.model, opts.gguf, outtype=opts.outtype, overwrite=opts.overwrite)
    for warning in report.warnings:
        print(f"arwkv export: warning: {warning}", file=sys.stderr)
    print(f"arwkv export: wrote {report.path} ({report.tensors} tensors, {report.outtype})")
    return 0


def plot(opts: o.PlotOptions) -> int:
    from .training.monitor import plot_run

    print(f"arwkv plot: wrote {plot_run(opts.run_dir)}")
    return 0


def demo(opts: o.DemoOptions) -> int:
    from .demo import DemoPlan, run_demo

    plan = DemoPlan.quick(opts.init) if opts.quick else DemoPlan(init=opts.init)
    for name in ("device", "keep_bias", "wkv", "head_size", "gguf", "stage1_steps", "stage2_steps"):
        if getattr(opts, name) is not None:  # (the step counts: the plan's unless given)
            setattr(plan, name, getattr(opts, name))
    run_demo(opts.out, plan)
    return 0


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one line for the command list, its options class (whose
    docstring is the --help description), and what runs it."""

    name: str
    summary: str
    options: type
    run: Callable[[object], int]


COMMANDS = (
    Command("convert", "teacher checkpoint directory -> student checkpoint directory", o.ConvertOptions,
            convert),
    Command("tokenize", "a corpus -> a token directory that every --data takes (large data: do this first)",
            o.TokenizeOptions, tokenize),
    Command("distill", "train a student: stage 1, 2, 3 or 4 (one process, or many under torchrun)",
            o.DistillConfig, distill),
    Command("hybridize", "a student -> a hybrid that keeps the teacher's attention where time mixing does "
            "worst", o.HybridizeOptions, hybridize),
    Command("eval", "perplexity, tokens/s and cache bytes on a dataset, or an lm-evaluation-harness task",
            o.EvalOptions, evaluate),
    Command("long-context", "loss by position and passkey retrieval of one or more checkpoints side by side",
            o.LongContextOptions, long_context),
    Command("generate", "stream a continuation of a prompt and print tokens/s", o.GenerateOptions, generate),
    Command("export", "a student as a GGUF file that llama.cpp runs (its arwkv7 architecture)",
            o.ExportOptions, export),
    Command("plot", "draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl", o.PlotOptions, plot),
    Command("demo", "all of it on the shipped small Qwen2 teacher, on this CPU, in minutes", o.DemoOptions,
            demo),
    Command("info", "the build, the CPU code path and the GPU", o.InfoOptions, info),
)


# ----------------------------------------------------------------------------- the parser


class Interrupted(Exception):
    """Ctrl-C; main() prints the message as one line, exit status 130 (as a shell reports SIGINT)."""


class UsageError(Exception):
    """A command line that argparse cannot read; main() prints it as one line, exit status 2."""


class OneLineErrors(argparse.ArgumentParser):
    """A mistyped flag or value is one line naming it (and where help is), not the usage text."""

    def error(self, message: str):  # argparse's hook; it must not return
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends every option's help with its default (or "(required)"), unless the help already says
    it (argparse.ArgumentDefaultsHelpFormatter would add a second one, and "None"). The
    benchmarks' scripts use it too."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "(default" in text
            or "(required)" in text
            or action.default is argparse.SUPPRESS
        ):
            return text
        if action.required:
            return f"{text} (required)"
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


class RawDescriptionDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """DefaultsHelpFormatter that keeps the line breaks of the top-level description (its command list)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``arwkv`` command line: one subcommand per job, its flags from its options dataclass."""
    listing = "\n".join(f"  {c.name:<13} {c.summary}" for c in COMMANDS)
    intro, _, rest = __doc__.partition("\n\nEvery command")
    parser = OneLineErrors(
        prog="arwkv",
        description=f"{intro}\n\ncommands:\n{listing}\n\nEvery command{rest}",
        formatter_class=RawDescriptionDefaultsFormatter,
    )
    # metavar and no help: the description's command list is the one list of commands in --help
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrors
    )
    for command in COMMANDS:
        doc = " ".join((command.options.__doc__ or command.summary).split())
        sub = commands.add_parser(command.name, description=doc, formatter_class=DefaultsHelpFormatter)
        o.add_arguments(sub, command.options)
        sub.set_defaults(handler=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a refusal or failure is one line on stderr, ``arwkv COMMAND: ...``, and
    exit status 1 (2 for a command line argparse cannot read)."""
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # named by the subcommand they were given to
            raise UsageError(
                f"arwkv {args.command}: unrecognized arguments: {' '.join(extra)} "
                f"(see arwkv {args.command} --help)"
            )
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    command: Command = args.handler
    try:
        return command.run(o.options_from_args(command.options, args))
    except (ImportError, RuntimeError, ValueError, OSError) as err:
        print(f"arwkv {args.command}: {err}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"arwkv {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
