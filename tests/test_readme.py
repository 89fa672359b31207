"""The README's paths, run as written: every `arwkv` command in its ```bash blocks (``torchrun
... -m arwkv.cli`` included, as one process), in order, in one working folder, on the shipped demo
assets instead of a real model and corpus, with tiny step counts. A flag, a command or an output
path that drifts from the code fails here.

What is substituted, and nothing else: the shell variables the README sets (TEACHER, DATA, ...)
point at the demo assets and at small chat and preference files made here; the size flags in
TINY take tiny values; ``arwkv demo`` runs ``--quick`` (once: a second demo is parsed, not run);
``arwkv eval`` scores at most --max-tokens 2000; ``/tmp/`` is the test's folder."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import time
from pathlib import Path

import pytest

from arwkv.cli import build_parser, main
from arwkv.demo import ASSETS
from arwkv.options import options_from_args

README = Path(__file__).resolve().parents[1] / "README.md"
# size flags -> the value a test run uses (everything else is run as the README writes it)
TINY = {"--max-steps": "2", "--seq-len": "64", "--batch-size": "4", "--micro-batch-size": "2",
        "--save-every": "1", "--warmup-steps": "1", "--rows": "4", "--max-len": "128", "--buckets": "3",
        "--max-tokens": "2000", "--max-new-tokens": "4", "--max-sequences": "2"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's lines with continuations joined (comments kept: shlex drops them)."""
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def local(word: str, tmp: Path) -> str:
    """A README path made to work here: from the repository root, and /tmp/ in the test's folder."""
    if word.startswith("python/arwkv/demo_assets"):
        return str(ASSETS) + word.removeprefix("python/arwkv/demo_assets")
    if word.startswith("/tmp/"):
        return f"{tmp}/{word.removeprefix('/tmp/')}"
    return word


def readme_commands(variables: dict[str, str], tmp: Path) -> list[list[str]]:
    """Every arwkv command of the README's bash blocks as an argv for arwkv.cli.main, in order,
    with the variables the README assigns replaced by ``variables``."""
    found = []
    for block in bash_blocks(README.read_text()):
        for line in commands(block):
            words = shlex.split(line, comments=True)
            if not words or re.fullmatch(r"[A-Z_]+=.*", words[0]):
                continue  # an assignment: the test gives its own value
            words = [re.sub(r"\$([A-Z_]+)", lambda m: variables[m.group(1)], local(w, tmp)) for w in words]
            if words[0] == "torchrun":
                words = words[words.index("arwkv.cli") + 1 :]  # the same command, one process
            elif words[0] == "arwkv":
                words = words[1:]
            else:
                continue  # pip, llama.cpp's tools
            found.append(words)
    return found


def tiny(argv: list[str]) -> list[str]:
    out = [TINY[argv[i - 1]] if i and argv[i - 1] in TINY else word for i, word in enumerate(argv)]
    if out[0] == "demo" and "--quick" not in out:
        out.append("--quick")
    if out[0] == "eval" and "--max-tokens" not in out:
        out += ["--max-tokens", TINY["--max-tokens"]]
    return out


def test_readme_paths_run_as_written(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    chats = work / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What does the for statement do, case {i}?"},
        {"role": "assistant", "content": "It iterates over the items of a sequence."}]}) + "\n"
        for i in range(24)))
    prefs = work / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Name a loop {i}.", "chosen": "for",
                                         "rejected": "the the the"}) + "\n" for i in range(24)))
    variables = {"TEACHER": str(ASSETS / "teacher"), "DATA": str(ASSETS / "train.jsonl"),
                 "SFT_DATA": str(chats), "PREFS": str(prefs), "RUN": str(work / "runs")}
    argvs = [tiny(a) for a in readme_commands(variables, tmp_path)]
    ran = {a[0] for a in argvs}
    assert {"convert", "distill", "eval", "export", "generate", "hybridize", "long-context", "demo",
            "info"} <= ran, ran
    monkeypatch.chdir(work)
    timings = []
    demos = 0
    for argv in argvs:
        if argv[0] == "demo":  # the second demo would repeat the first (both --quick here): read, not run
            demos += 1
            if demos > 1:
                parsed = build_parser().parse_args(argv)
                options_from_args(parsed.handler.options, parsed)
                continue
        began = time.perf_counter()
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 0, f"arwkv {shlex.join(argv)}\n{err[-2000:]}"
        timings.append(f"{time.perf_counter() - began:6.1f} s  arwkv {shlex.join(argv)[:100]}")
    with capsys.disabled():
        print("\n" + "\n".join(timings))
    # what the paths promise exists: the demo's report, every stage's student, the GGUF files
    assert (work / "arwkv-demo" / "report.md").is_file()
    for stage in (1, 2, 3, 4):
        assert (work / "runs" / f"stage{stage}" / "student" / "config.json").is_file()
    assert (work / "runs" / "student-f16.gguf").is_file() and (work / "student.gguf").is_file()
    assert (work / "long-context" / "long_context.json").is_file()


@pytest.mark.parametrize("flag", sorted(TINY))
def test_every_substituted_flag_is_a_real_flag(flag):
    """TINY names only flags some command has, so a rename in the code cannot hide here."""
    import dataclasses

    from arwkv.cli import COMMANDS
    from arwkv.options import flag_of

    assert any(flag == flag_of(f.name) for c in COMMANDS for f in dataclasses.fields(c.options))


def test_every_flag_the_docs_name_exists():
    """Every --flag written in the README and docs/ is a flag of an arwkv command (or one of the
    other tools' flags listed here), so renaming a flag in the code without the docs fails."""
    from arwkv.cli import COMMANDS
    from arwkv.options import flag_of

    ours = {flag_of(f.name) for c in COMMANDS for f in dataclasses.fields(c.options)}
    ours |= {"--" + "no-" + flag_of(f.name)[2:] for c in COMMANDS for f in dataclasses.fields(c.options)}
    ours |= {"--config", "--help"}
    others = {  # the flags of the other tools the docs show
        "torchrun": {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                     "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"},
        "pip": {"--no-build-isolation", "--no-deps", "--force-reinstall", "--editable", "--extra-index-url"},
        "vllm": {"--max-model-len", "--tensor-parallel-size"},
        "cmake, ctest, pytest": {"--build", "--test-dir", "--durations"},
        "tests/cpp/test_wkv_gpu_emulated.cpp": {"--banks"},
        "benchmarks/": {"--outtypes", "--json", "--ops", "--repeat", "--shapes", "--algorithms",
                        "--llama-build"},
    }
    ours |= set().union(*others.values())
    documents = [README, *sorted((README.parent / "docs").glob("*.md"))]
    unknown = {}
    for doc in documents:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", doc.read_text()):
            if flag not in ours:
                unknown.setdefault(flag, doc.name)
    assert not unknown, unknown


NUMBER = r"\d+(?:\.\d+)?(?:e-?\d+)?"


def stated(figure: str, saved: list[float]) -> bool:
    """Whether a README figure ("67.4", "3.4e-7", "1676") is one of the saved numbers as rounded
    to the digits the README gives."""
    mantissa = figure.split("e")[0]
    digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
    half = 0.5 * 10.0 ** (-digits) * (10.0 ** int(figure.split("e")[1]) if "e" in figure else 1.0)
    value = float(figure)
    return any(abs(x - value) <= half * (1 + 1e-9) for x in saved)


def test_measured_figures_come_from_the_saved_results():
    """Every number in the README's measured tables is, to the digits it gives, a number of the
    saved result its row links to, and the demo report it quotes is the saved report's own text,
    so the README cannot drift from the measurements (it once said 99 KiB of state where the
    report said 195)."""
    text = README.read_text()
    measured = text[text.index("## Measured"):text.index("## Where to read more")]
    rows = [r for r in measured.splitlines() if r.startswith("| ") and "](benchmarks/results/" in r]
    assert len(rows) >= 10
    missing = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        value, link = cells[1], re.search(r"\]\((benchmarks/results/[^)]+)\)", cells[2]).group(1)
        saved = [float(x) for x in re.findall(NUMBER, (README.parent / link).read_text().replace(",", ""))]
        missing += [(n, link) for n in re.findall(NUMBER, value.replace(",", "")) if not stated(n, saved)]
    assert not missing, missing
    quoted = re.search(r"`report.md` says:\n\n```\n(.*?)```", text, re.S).group(1)
    report = (README.parent / "benchmarks/results/demo-cpu-2core/report-transfer-head64.md").read_text()
    assert all(line in report for line in quoted.splitlines()), quoted


def test_a_drifted_figure_is_caught():
    assert stated("67.4", [67.37]) and stated("3.4e-7", [3.413e-07]) and stated("1676", [1675.73])
    assert not stated("99", [199680.0, 195.0]) and not stated("1.85", [1852.0]) and not stated("24", [24.8])
