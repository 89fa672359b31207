"""The training-data path at scale: `arwkv tokenize` and `arwkv distill` on synthetic corpora made
from the demo's texts (0.1, 1 and 3 GB by default; GB = 1e9 bytes), each command in a fresh process.

    python benchmarks/bench_data_scale.py                     # 1-2 h on 2 cores; ~9 GB of disk in --work
    python benchmarks/bench_data_scale.py --sizes 0.002,0.004 --steps 3 --seq-len 128 --out-stem /tmp/t

Peak RSS is measured two ways: the VmRSS of the process and all its descendants (tokenizer workers)
summed, sampled every 0.1 s ("tree"); and ru_maxrss from wait4 ("main": the process's own peak, or a
waited-for child's if that was larger, as Linux counts them in).
- tokenize: each text corpus with --workers 1 and 2 (the demo teacher's tokenizer, 0.01% held out):
  seconds, tokens/s, and the speed-up of 2 workers over 1 (goal >= 1.8x).
- distill, on the 2-worker token directories: stage 1 on the smallest and the largest corpus, stage 2
  on the middle one, stage 3 on a chat corpus of the middle size. Start: launch until step 1's line
  is in metrics.jsonl (goal <= 10 s). Peak RSS: stage 1's on the largest corpus within 10% of the
  smallest's. Data wait: sum(data_s) / sum(step seconds) over steps 2..N, a step's seconds being
  batch_size * seq_len / tokens_per_s (goal <= 2%). Each run ends with distill's validation pass
  over the held-out rows and its final checkpoint (in "run s", not in the other figures).

Corpora: the demo's train.jsonl texts cycled, each suffixed with its record number (no two
documents alike); the chat corpus's records are a user turn (a text's first sentence, at most 200
characters) and an assistant turn (the rest). Corpora stay in --work and are reused by later runs
(delete --work to reclaim the disk); the student, token directories, runs and logs are made anew
each run and removed at the end unless --keep (a failed run leaves them, with its logs, for a look).
Results: OUT_STEM.json and OUT_STEM.md (a bare stem goes to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from arwkv.cli import RawDescriptionDefaultsFormatter

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "python" / "arwkv" / "demo_assets"
TEACHER = ASSETS / "teacher"
RESULTS = ROOT / "benchmarks" / "results"
SAMPLE_S, POLL_S = 0.1, 0.02  # RSS sampling, and polling for exit and for metrics.jsonl's first line
GOAL_SPEEDUP, GOAL_START_S, GOAL_RSS_GROWTH, GOAL_DATA_SHARE = 1.8, 10.0, 0.10, 0.02
BEGAN = time.perf_counter()


class CommandFailed(Exception):
    """A command exited non-zero or ran past its timeout: a one-line message, then its stderr's tail."""


def log(line: str) -> None:
    print(f"[{time.perf_counter() - BEGAN:7.0f} s] {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- process tree RSS

_CHILDREN_FILES = Path(f"/proc/self/task/{os.getpid()}/children").exists()  # CONFIG_PROC_CHILDREN


def _child_map() -> dict[int, list[int]]:
    """{parent pid: child pids} from every /proc/PID/stat (kernels without the children files)."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree_rss_kb(root: int) -> int:
    """VmRSS of process ``root`` and all its descendants, summed, in kB."""
    kid_map = None if _CHILDREN_FILES else _child_map()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            if kid_map is None:
                todo += [int(k) for task in Path(f"/proc/{pid}/task").iterdir()
                         for k in (task / "children").read_text().split()]
            else:
                todo += kid_map.get(pid, [])
        except OSError:  # it exited meanwhile
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total


# ----------------------------------------------------------------------------- running a command


@dataclass
class Measured:
    seconds: float
    peak_tree_mb: float
    peak_main_mb: float
    first_line_s: float | None = None  # launch until ``watch`` first held a complete line


def measure(cmd: list[str], timeout: float, logs: Path, watch: Path | None = None) -> Measured:
    """Runs ``cmd`` in its own session (stdout/stderr to logs.out/.err), sampling its tree's RSS;
    raises CommandFailed when it exits non-zero or runs past ``timeout`` seconds (then killed)."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    err_path = logs.with_name(logs.name + ".err")
    with open(logs.with_name(logs.name + ".out"), "wb") as out, open(err_path, "wb") as err:
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
    peak_kb, first, next_sample, pid, status, usage = 0, None, began, 0, 0, None
    try:
        while not pid:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter()
            if not pid and now >= next_sample:
                peak_kb, next_sample = max(peak_kb, tree_rss_kb(proc.pid)), now + SAMPLE_S
            if watch is not None and first is None and watch.exists() and b"\n" in watch.read_bytes():
                first = now - began
            if not pid and now - began > timeout:
                raise CommandFailed(f"{shlex.join(cmd)} timed out after {timeout:.0f} s (killed)"
                                    f"{_tail(err_path)}")
            if not pid:
                time.sleep(POLL_S)
    finally:
        if not pid:  # timed out or interrupted: the whole session goes
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status) if pid else -signal.SIGKILL
    seconds = time.perf_counter() - began
    if proc.returncode:
        raise CommandFailed(f"{shlex.join(cmd)} failed (exit {proc.returncode}) after {seconds:.0f} s"
                            f"{_tail(err_path)}")
    return Measured(seconds, peak_kb / 1e3, usage.ru_maxrss / 1e3, first)


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    return "; its stderr ends:\n" + "\n".join("    " + line for line in text) if text else "; no stderr"


def arwkv_bin() -> str:
    """The arwkv command beside this Python, else on PATH."""
    local = Path(sys.executable).with_name("arwkv")
    found = str(local) if local.exists() else shutil.which("arwkv")
    if not found:
        raise CommandFailed("no arwkv command beside this Python or on PATH (pip install -e . first)")
    return found


# ----------------------------------------------------------------------------- corpora


def text_record(i: int, text: str) -> dict:
    return {"text": f"{text} [{i}]"}


def chat_record(i: int, text: str) -> dict:
    """A user turn (the first sentence, at most 200 characters) and the assistant's (the rest)."""
    cut = text.find(". ", 0, 200)
    cut = cut + 1 if cut > 0 else min(200, len(text) // 2)
    return {"messages": [{"role": "user", "content": f"[{i}] {text[:cut].strip()}"},
                         {"role": "assistant", "content": text[cut:].strip()}]}


def write_corpus(path: Path, size: int, texts: list[str], record: Callable[[int, str], dict]) -> None:
    """record(i, text) lines, cycling through ``texts``, until the file holds ``size`` bytes; kept
    when a complete one is already there (written beside it and renamed when done)."""
    if path.exists() and path.stat().st_size >= size:
        log(f"reusing {path}")
        return
    log(f"writing {path} ({size:,} bytes)")
    partial = path.with_name(path.name + ".partial")
    written, i = 0, 0
    with open(partial, "w", encoding="utf-8") as f:
        while written < size:
            line = json.dumps(record(i, texts[i % len(texts)])) + "\n"  # ASCII (ensure_ascii): chars = bytes
            f.write(line)
            written, i = written + len(line), i + 1
    partial.rename(path)


# ----------------------------------------------------------------------------- the measurements


def tokenize(arwkv: str, corpus: Path, out: Path, workers: int, gb: float, logs: Path) -> dict:
    """One `arwkv tokenize` of ``corpus`` into a fresh ``out``."""
    log(f"tokenize {corpus.name}, {workers} worker(s)")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [arwkv, "tokenize", "--data", str(corpus), "--tokenizer", str(TEACHER), "--out", str(out),
           "--workers", str(workers), "--validation-fraction", "0.0001"]
    m = measure(cmd, 900 + 3600 * gb, logs)  # ~1,300 s per GB at 1 worker on the 2-core machine
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    return {"corpus": corpus.name, "gb": gb, "workers": workers, "tokens": tokens, "seconds": m.seconds,
            "tokens_per_s": tokens / m.seconds, "speedup": None, "peak_rss_tree_mb": m.peak_tree_mb,
            "peak_rss_main_mb": m.peak_main_mb}


def distill(arwkv: str, stage: int, data: dict, student: Path, run: Path, args, logs: Path) -> dict:
    """One `arwkv distill` run of ``args.steps`` steps on the token directory ``data["dir"]``."""
    log(f"distill stage {stage} on {data['name']}")
    shutil.rmtree(run, ignore_errors=True)
    teacher = ["--teacher", str(TEACHER)] if stage < 3 else []
    cmd = [arwkv, "distill", "--stage", str(stage), *teacher, "--student", str(student),
           "--data", str(data["dir"]), "--out", str(run), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--log-every", "1000",
           "--save-every", "0"]
    m = measure(cmd, 600 + 60 * args.steps + 600 * data["gb"], logs, watch=run / "metrics.jsonl")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = [r for r in records if r["step"] >= 2]
    step_s = [args.batch_size * args.seq_len / r["tokens_per_s"] for r in later]
    return {"stage": stage, "corpus": data["name"], "gb": data["gb"], "corpus_tokens": data["tokens"],
            "start_to_step1_s": m.first_line_s, "peak_rss_tree_mb": m.peak_tree_mb,
            "peak_rss_main_mb": m.peak_main_mb, "run_s": m.seconds,
            "step_s_mean": sum(step_s) / len(step_s) if later else None,
            "data_wait_share": sum(r["data_s"] for r in later) / sum(step_s) if later else None}


def goals(tok_rows: list[dict], dist_rows: list[dict]) -> list[dict]:
    """Each goal with the numbers it was judged on."""
    out = []
    for r in tok_rows:
        if r["speedup"] is not None:
            out.append({"goal": f"tokenize {r['corpus']}: 2 workers >= {GOAL_SPEEDUP}x the tokens/s of 1",
                        "met": r["speedup"] >= GOAL_SPEEDUP, "value": f"{r['speedup']:.2f}x"})
    for r in dist_rows:
        name = f"stage {r['stage']} on {r['corpus']}"
        start = r["start_to_step1_s"]
        out.append({"goal": f"{name}: launch to step 1 <= {GOAL_START_S:g} s",
                    "met": start is not None and start <= GOAL_START_S,
                    "value": "no step logged" if start is None else f"{start:.1f} s"})
        if r["data_wait_share"] is not None:
            out.append({"goal": f"{name}: data wait <= {100 * GOAL_DATA_SHARE:g}% of steps 2..N",
                        "met": r["data_wait_share"] <= GOAL_DATA_SHARE,
                        "value": f"{100 * r['data_wait_share']:.2f}%"})
    stage1 = [r for r in dist_rows if r["stage"] == 1]
    if len(stage1) > 1:
        small, large = stage1[0]["peak_rss_tree_mb"], stage1[-1]["peak_rss_tree_mb"]
        out.append({"goal": f"stage 1 peak RSS: {stage1[-1]['corpus']} within {100 * GOAL_RSS_GROWTH:g}% "
                            f"of {stage1[0]['corpus']}", "met": large <= (1 + GOAL_RSS_GROWTH) * small,
                    "value": f"{large:.0f} MB vs {small:.0f} MB ({100 * (large / small - 1):+.1f}%)"})
    return out


def machine() -> dict:
    """The CPU, torch, the date and the commit, for the JSON."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    pairs = (line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    field = {k.strip(): v.strip() for k, v in pairs}  # the last CPU's
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    return {"cpu": field.get("model name", "?"), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "avx512f": "avx512f" in field.get("flags", "").split(),
            "torch": torch, "commit": git.stdout.strip() or None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *rows]]


def num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(meta: dict, settings: dict, tok_rows: list[dict], dist_rows: list[dict],
             judged: list[dict]) -> str:
    """The results as markdown: the machine, a table per command, the goals."""
    lines = [f"# Data path at scale ({meta['date']}, commit {meta['commit']})", "",
             f"{meta['cpu']}, {meta['usable_cores']} of {meta['cores']} cores, avx512f {meta['avx512f']}, "
             f"torch {meta['torch']}; distill {settings['steps']} steps of {settings['batch_size']} x "
             f"{settings['seq_len']} tokens", "", "## arwkv tokenize", ""]
    lines += table(
        ["corpus", "GB", "tokens", "workers", "seconds", "tokens/s", "speed-up", "peak RSS tree MB",
         "peak RSS main MB"],
        [[r["corpus"], f"{r['gb']:g}", f"{r['tokens']:,}", str(r["workers"]), f"{r['seconds']:.1f}",
          f"{r['tokens_per_s']:,.0f}", num(r["speedup"], ".2f"), f"{r['peak_rss_tree_mb']:.0f}",
          f"{r['peak_rss_main_mb']:.0f}"] for r in tok_rows])
    lines += ["", "## arwkv distill", ""]
    lines += table(
        ["stage", "corpus", "tokens in corpus", "start to step 1 s", "peak RSS tree MB", "peak RSS main MB",
         "data wait %", "step s (2..N)", "run s"],
        [[str(r["stage"]), r["corpus"], f"{r['corpus_tokens']:,}", num(r["start_to_step1_s"], ".1f"),
          f"{r['peak_rss_tree_mb']:.0f}", f"{r['peak_rss_main_mb']:.0f}",
          num(None if r["data_wait_share"] is None else 100 * r["data_wait_share"], ".2f"),
          num(r["step_s_mean"], ".3f"), f"{r['run_s']:.1f}"] for r in dist_rows])
    lines += ["", "## Goals", ""]
    lines += [f"- {'met' if g['met'] else 'MISSED'}: {g['goal']} ({g['value']})" for g in judged]
    return "\n".join(lines) + "\n"


def run_all(args) -> tuple[dict, str]:
    arwkv = arwkv_bin()
    sizes = sorted(float(s) for s in args.sizes.split(","))
    middle = sizes[len(sizes) // 2]
    work = Path(args.work)
    corpora, tokens, runs, logs = (work / d for d in ("corpora", "tokens", "runs", "logs"))
    corpora.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)["text"] for line in (ASSETS / "train.jsonl").read_text().splitlines() if line]
    text_corpus = {gb: corpora / f"text-{gb:g}GB.jsonl" for gb in sizes}
    chat_corpus = corpora / f"chat-{middle:g}GB.jsonl"
    for gb, path in text_corpus.items():
        write_corpus(path, round(gb * 1e9), texts, text_record)
    write_corpus(chat_corpus, round(middle * 1e9), texts, chat_record)

    tok_rows, data = [], {}
    for gb, path in text_corpus.items():
        skip_1 = args.skip_tokenize_1_worker_above is not None and gb > args.skip_tokenize_1_worker_above
        for workers in (2,) if skip_1 else (1, 2):
            out = tokens / f"{path.stem}-w{workers}"
            tok_rows.append(tokenize(arwkv, path, out, workers, gb, logs / out.name))
            if workers == 1:
                shutil.rmtree(out)  # the same tokens as the 2-worker directory's
        if not skip_1:
            tok_rows[-1]["speedup"] = tok_rows[-1]["tokens_per_s"] / tok_rows[-2]["tokens_per_s"]
        data[gb] = {"name": f"text {gb:g} GB", "gb": gb, "dir": out, "tokens": tok_rows[-1]["tokens"]}
    out = tokens / f"{chat_corpus.stem}-w2"
    tok_rows.append(tokenize(arwkv, chat_corpus, out, 2, middle, logs / out.name))
    chat = {"name": f"chat {middle:g} GB", "gb": middle, "dir": out, "tokens": tok_rows[-1]["tokens"]}

    student = work / "student"
    shutil.rmtree(student, ignore_errors=True)
    log("convert the demo teacher into a student")
    measure([arwkv, "convert", "--teacher", str(TEACHER), "--out", str(student)], 600, logs / "convert")
    plan = [(1, data[sizes[0]])] + ([(1, data[sizes[-1]])] if len(sizes) > 1 else []) + [(2, data[middle]),
                                                                                        (3, chat)]
    dist_rows = [distill(arwkv, stage, d, student, runs / f"stage{stage}-{d['dir'].name}", args,
                         logs / f"stage{stage}-{d['dir'].name}") for stage, d in plan]
    if not args.keep:
        for path in (tokens, runs, logs, student):
            shutil.rmtree(path, ignore_errors=True)

    meta, judged = machine(), goals(tok_rows, dist_rows)
    settings = {k: getattr(args, k) for k in ("sizes", "steps", "seq_len", "batch_size",
                                              "skip_tokenize_1_worker_above")}
    result = {"machine": meta, "settings": settings, "tokenize": tok_rows, "distill": dist_rows,
              "goals": judged}
    return result, markdown(meta, settings, tok_rows, dist_rows, judged)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsFormatter)
    ap.add_argument("--sizes", default="0.1,1,3", help="comma-separated corpus sizes in GB (1e9 bytes)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "arwkv-bench-data-scale"),
                    help="where corpora (kept, reused), token directories and runs go")
    ap.add_argument("--steps", type=int, default=30, help="distill steps per run")
    ap.add_argument("--seq-len", type=int, default=512, help="distill tokens per row")
    ap.add_argument("--batch-size", type=int, default=4, help="distill rows per step")
    ap.add_argument("--keep", action="store_true", help="keep the token directories, runs, student and logs")
    ap.add_argument("--skip-tokenize-1-worker-above", type=float, metavar="GB",
                    help="no 1-worker tokenize (and no speed-up) for corpora larger than this")
    ap.add_argument("--out-stem", default="data-scale-cpu-2core",
                    help="results go to OUT_STEM.json and .md; a bare name, under benchmarks/results/")
    ap.add_argument("--no-save", action="store_true", help="print the results only")
    args = ap.parse_args(argv)
    try:
        result, text = run_all(args)
    except CommandFailed as err:
        print(f"bench_data_scale: {err}", file=sys.stderr)
        return 1
    print(text, end="")
    if not args.no_save:
        stem = Path(args.out_stem)
        stem = RESULTS / stem if stem.parent == Path(".") else stem
        Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        Path(f"{stem}.md").write_text(text)
        log(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
