"""The shape of the product: every command built the same way from its options dataclass, device
resolution that knows the built kernels, one loading module's refusals, no import cycle, and a
kernels' package whose _C holds nothing but the ops it registers."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import arwkv_ext
from arwkv import options
from arwkv.cli import COMMANDS, build_parser, main
from arwkv.runtime import ConfigError, resolve_device
from fixtures import make_run_inputs

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "arwkv"


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> dict[str, Path]:
    return make_run_inputs(tmp_path_factory.mktemp("tiny"))


# ----------------------------------------------------------------------------- the modules


def _imports(path: Path, module: str) -> set[str]:
    """The arwkv modules that ``module`` (file ``path``) imports, anywhere in it (functions and
    TYPE_CHECKING blocks included)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found.update(n for n in [target, *names] if n.startswith("arwkv."))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("arwkv."))
    return found


def test_no_import_cycle_among_the_modules():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {
        name: {m for m in _imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }
    assert graph["arwkv.training.trainer"] >= {"arwkv.training.stages", "arwkv.loading"}  # the scan works
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_command_line_loads_without_torch():
    """--help and a mistyped flag answer at once: building the parser imports neither torch nor
    transformers."""
    code = (
        "import sys; from arwkv.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_kernels_package_C_is_empty_and_build_facts_are_ops():
    assert [n for n in vars(arwkv_ext._C) if not n.startswith("__")] == []
    assert tuple(torch.ops.arwkv.head_sizes()) == arwkv_ext.HEAD_SIZES and len(arwkv_ext.HEAD_SIZES) > 0
    assert torch.ops.arwkv.cpu_isa() == arwkv_ext.cpu_isa() in arwkv_ext.cpu_isas_supported()
    assert torch.ops.arwkv.cpu_algorithm(7, "forward") in ("step", "chunked")
    with pytest.raises(ValueError, match="direction must be 'forward' or 'backward'"):
        torch.ops.arwkv.cpu_algorithm(6, "sideways")
    if not any(k != "cpu" for k in arwkv_ext.build_info["kernels"]):
        with pytest.raises(RuntimeError, match="built without GPU kernels"):
            torch.ops.arwkv.gpu_tile_selftest()


# ----------------------------------------------------------------------------- every command alike


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_field_is_a_flag_and_a_config_key(command, tmp_path):
    """A command's flags are its options' fields (same names, help with the default), and a config
    file with the same keys makes the same options as the flags."""
    sub = build_parser()._subparsers._group_actions[0].choices[command.name]
    flags = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    fields = {f.name: f for f in dataclasses.fields(command.options)}
    assert set(flags) == set(fields)
    for name, f in fields.items():
        assert f.metadata["help"] in (flags[name].help or "")
        if not f.metadata["positional"]:
            assert flags[name].option_strings[0] == options.flag_of(name)  # (and --no-NAME for a switch)
            assert ("(required)" if f.metadata["required"] else "(default: ") in flags[name].help


def _given(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Per command, flags that make valid options, and the same as a YAML file."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    return {
        "convert": (
            ["--teacher", "t", "--out", "o", "--wkv-layers", "0,2", "--no-gate"],
            "teacher: t\nout: o\nwkv-layers: [0, 2]\ngate: false\n",
        ),
        "tokenize": (
            ["--data", str(data), "--tokenizer", "t", "--out", "o", "--workers", "2", "--validation-fraction",
             "0.01"],
            f"data: {data}\ntokenizer: t\nout: o\nworkers: 2\nvalidation-fraction: 0.01\n",
        ),
        "distill": (
            ["--stage", "3", "--student", "s", "--data", str(data), "--out", "o", "--lr", "2e-5"],
            f"stage: 3\nstudent: s\ndata: {data}\nout: o\nlr: 2e-5\n",
        ),
        "hybridize": (
            ["--teacher", "t", "--run", "r", "--out", "o", "--keep", "2"],
            "teacher: t\nrun: r\nout: o\nkeep: 2\n",
        ),
        "eval": (["--model", "m", "--data", "d", "--dtype", "bf16"], "model: m\ndata: d\ndtype: bf16\n"),
        "long-context": (
            ["--model", "a", "b", "--out", "o", "--passkey-depths", "0,0.5"],
            "model: [a, b]\nout: o\npasskey_depths: '0,0.5'\n",
        ),
        "generate": (
            ["--model", "m", "--prompt", "hi", "--temperature", "0.5"],
            "model: m\nprompt: hi\ntemperature: 0.5\n",
        ),
        "export": (
            ["--model", "m", "--gguf", "x.gguf", "--outtype", "q8_0"],
            "model: m\ngguf: x.gguf\nouttype: q8_0\n",
        ),
        "plot": (["run"], ""),
        "demo": (["--quick", "--stage2-steps", "7"], "quick: true\nstage2-steps: 7\n"),
        "info": ([], ""),
    }


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_flags_and_config_files_agree_for_every_command(command, tmp_path):
    flags, yaml = _given(tmp_path)[command.name]
    parser = build_parser()
    from_flags = options.options_from_args(command.options, parser.parse_args([command.name, *flags]))
    if yaml:
        (tmp_path / "c.yaml").write_text(yaml)
        positional = [a for a in flags if command.name == "plot"]
        from_file = options.options_from_args(
            command.options,
            parser.parse_args([command.name, "--config", str(tmp_path / "c.yaml"), *positional]),
        )
        assert from_file == from_flags


@pytest.mark.parametrize(
    "argv, message",
    [
        (["distill", "--kl", "adaptve"], "argument --kl: invalid choice: 'adaptve'"),
        (
            ["convert", "--teacher", "t", "--out", "o", "--head-size", "sixty"],
            "argument --head-size: 'sixty' is not a whole",
        ),
        (
            ["eval", "--model", "m", "--data", "d", "--batch-size", "0"],
            "--batch-size must be at least 1, got 0",
        ),
        (["convert", "--out", "o"], "--teacher is required"),
        (["eval", "--model", "m"], "give --data (perplexity) and/or --lm-eval-task"),
    ],
)
def test_bad_command_lines_are_one_line(argv, message, capsys):
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"arwkv {argv[0]}: ") and message in err, err


def test_config_file_errors_name_the_file_and_key(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("model = 'm'\ndata = 'd'\nseq_len = 'long'\n")
    assert main(["eval", "--config", str(tmp_path / "c.toml")]) == 1
    err = capsys.readouterr().err
    assert err == f"arwkv eval: --config {tmp_path / 'c.toml'}: seq_len = 'long' is not a whole number\n"


# ----------------------------------------------------------------------------- devices


@pytest.fixture
def gpu_without_kernels(monkeypatch):
    """A GPU that torch sees, with an arwkv_ext built for the CPU only."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(arwkv_ext.build_info, "kernels", ["cpu"])


def test_auto_never_picks_a_gpu_the_kernels_cannot_run(gpu_without_kernels):
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="^--device cuda: arwkv was built without GPU kernels"):
        resolve_device("cuda")


DEVICE_COMMANDS = [
    ["eval", "--model", "{student}", "--data", "{text}"],
    ["long-context", "--model", "{student}", "--data", "{text}", "--out", "{out}"],
    ["generate", "--model", "{student}", "--prompt", "w1 w2"],
    ["hybridize", "--teacher", "{teacher}", "--student", "{student}", "--data", "{text}", "--keep", "1",
     "--out", "{out}"],
    ["distill", "--stage", "2", "--teacher", "{teacher}", "--student", "{student}", "--data", "{text}",
     "--out", "{out}"],
    ["demo", "--quick", "--out", "{out}"],
]


@pytest.mark.parametrize("argv", DEVICE_COMMANDS, ids=lambda a: a[0])
def test_cuda_without_gpu_kernels_is_refused_before_anything_is_written(
    argv, run_inputs, tmp_path, capsys, gpu_without_kernels
):
    values = {
        "student": run_inputs["student"],
        "teacher": run_inputs["teacher"],
        "text": run_inputs["text"],
        "out": tmp_path / "out",
    }
    assert main([a.format(**values) for a in argv] + ["--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"arwkv {argv[0]}: --device cuda: arwkv was built without GPU kernels"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--teacher", "{student}", "--out", "{out}"],
        [
            "distill",
            "--stage",
            "2",
            "--teacher",
            "{student}",
            "--student",
            "{student}",
            "--data",
            "{text}",
            "--out",
            "{out}",
            "--device",
            "cpu",
        ],
        ["hybridize", "--teacher", "{student}", "--student", "{student}", "--layers", "0", "--out", "{out}"],
    ],
    ids=lambda a: a[0],
)
def test_a_student_given_as_teacher_is_one_line(argv, run_inputs, tmp_path, capsys):
    values = {"student": run_inputs["student"], "text": run_inputs["text"], "out": tmp_path / "out"}
    assert (
        main(
            [a.format(**values) for a in argv],
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err == (
        f"arwkv {argv[0]}: --teacher {run_inputs['student']} is an arwkv student, not a Transformer "
        "teacher; give the checkpoint the student was converted from\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("terminal", [False, True], ids=["no terminal", "terminal"])
def test_nothing_prompts(terminal, run_inputs, tmp_path):
    """A student where a teacher belongs, and a student scored or decoded: no question is asked
    (transformers asks before running a checkpoint's code, and waits on a terminal); the
    refusal is one line, at once, with or without a terminal on standard input."""
    import os
    import pty

    student, text = str(run_inputs["student"]), str(run_inputs["text"])
    runs = [
        (["convert", "--teacher", student, "--out", str(tmp_path / "c")], 1),
        (
            [
                "hybridize",
                "--teacher",
                student,
                "--student",
                student,
                "--layers",
                "0",
                "--out",
                str(tmp_path / "h"),
            ],
            1,
        ),
        (
            [
                "eval",
                "--model",
                student,
                "--data",
                text,
                "--seq-len",
                "16",
                "--max-tokens",
                "64",
                "--device",
                "cpu",
            ],
            0,
        ),
        (
            ["generate", "--model", student, "--prompt", "w1 w2", "--max-new-tokens", "2", "--device", "cpu"],
            0,
        ),
    ]
    for argv, status in runs:
        if terminal:
            leader, follower = pty.openpty()
            stdin = follower
        else:
            leader, stdin = None, subprocess.DEVNULL
        try:
            done = subprocess.run(
                [sys.executable, "-m", "arwkv.cli", *argv],
                stdin=stdin,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        finally:
            if leader is not None:
                os.close(leader)
                os.close(follower)
        assert done.returncode == status, done.stderr[-2000:]
        assert "[y/N]" not in done.stderr + done.stdout and "trust_remote_code" not in done.stderr
        if status:
            assert (
                done.stderr.count("\n") == 1
                and "is an arwkv student, not a Transformer teacher" in done.stderr
            )
