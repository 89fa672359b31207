"""The op contract beyond the reference grid: registration (opcheck, torch.compile), exact
float64 gradients (gradcheck), numerics at long T and extreme decays (on the CPU and, where there
is one, the GPU), memory layouts, T = 0, and agreement between the CPU instruction-set paths."""

from __future__ import annotations

import os

import pytest
import torch

import arwkv_ext
from arwkv_ext.testing import make_inputs, rel_error, run_with_grads
from fixtures import (
    CPU_ALGORITHMS,
    DEVICES,
    GPU_ALGORITHMS,
    OP_NAMES,
    OPS,
    REFERENCES,
    flat,
    on,
    output_names,
)


def sample_args(op: str, B=1, T=7, H=2, N=16, dtype=torch.float32, state=True, packed=False,
                requires_grad=True):
    """Positional arguments of torch.ops.arwkv.<op> with awkward sizes."""
    xs = make_inputs(op, B, T, H, N, dtype=dtype, seed=T)
    S = 2 if packed else B
    s0 = torch.randn(S, H, N, N, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * 0.2
    cu = torch.tensor([0, 3, T], dtype=torch.int64) if packed else None
    if requires_grad:
        xs = [x.requires_grad_() for x in xs]
        s0.requires_grad_()
    return (*xs, s0 if state else None, cu)


def differentiable(args) -> list[torch.Tensor]:
    return [a for a in args if a is not None and a.requires_grad]


def check_each_algorithm(device, run, want, names, tol) -> None:
    """run() (y, state, grads) against want, finite and within tol, once per algorithm of the
    device's kernels (ARWKV_CPU_ALGORITHM or ARWKV_GPU_ALGORITHM)."""
    variable = "ARWKV_CPU_ALGORITHM" if device == "cpu" else "ARWKV_GPU_ALGORITHM"
    for algorithm in CPU_ALGORITHMS if device == "cpu" else GPU_ALGORITHMS:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(variable, algorithm)
            got = run()
        for name, a, b in zip(names, flat(got), flat(want), strict=True):
            assert torch.isfinite(a).all(), f"{algorithm} {name}"
            assert rel_error(a, b) <= tol, f"{algorithm} {name}: {rel_error(a, b):.2e}"


@pytest.mark.parametrize("op", OP_NAMES)
def test_opcheck(op):
    overload = getattr(torch.ops.arwkv, op).default
    for kwargs in [{}, {"state": False}, {"packed": True, "B": 1}, {"dtype": torch.bfloat16, "T": 5}]:
        torch.library.opcheck(overload, sample_args(op, **kwargs))


@pytest.mark.parametrize("op", OP_NAMES)
def test_opcheck_backward_ops(op):
    overload = getattr(torch.ops.arwkv, f"{op}_backward").default
    args = sample_args(op, requires_grad=False)
    y, state = getattr(torch.ops.arwkv, op)(*args)
    torch.library.opcheck(overload, (*args, torch.randn_like(y), torch.randn_like(state)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("op", OP_NAMES)
def test_gradcheck_float64(op, packed, cpu_algorithm):
    args = sample_args(op, B=1 if packed else 2, T=6, H=1, N=16, dtype=torch.float64, packed=packed)
    assert torch.autograd.gradcheck(lambda *a: getattr(torch.ops.arwkv, op)(*a), args, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("op", OP_NAMES)
def test_torch_compile_fullgraph(op):
    fn = OPS[op]

    def model(*args):
        y, state = fn(*args)
        return (y * y).sum() + state.square().sum()

    args = sample_args(op, T=9, state=True)
    eager = torch.autograd.grad(model(*args[:-1]), differentiable(args))
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got = torch.autograd.grad(compiled(*args[:-1]), differentiable(args))
    for g, e in zip(got, eager, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_float32_long_sequence_wide_decays(op, device):
    """float32, T = 4096, log decays down to -20: y, state and every gradient within 1e-4 of
    float64 (the backward recomputes states; it never divides by the decay). On the CPU, one head,
    both algorithms, against the step-by-step reference; on a GPU, two heads against the float64
    CPU kernel (which the CPU case and the reference grid tie to the reference)."""
    N, T = 64, 4096
    H, float64 = (1, REFERENCES[op]) if device == "cpu" else (2, OPS[op])
    inputs = make_inputs(op, 1, T, H, N, decay="wide", min_log_decay=-20.0, seed=5)
    s0 = torch.randn(1, H, N, N) * 0.5
    g = torch.Generator().manual_seed(0)
    gy = torch.randn(1, T, H, N, generator=g, dtype=torch.float64)
    gs = torch.randn(1, H, N, N, generator=g, dtype=torch.float64)
    want = run_with_grads(float64, [x.double() for x in inputs], s0.double(), None, gy, gs)
    args = on(device, [s0, None, gy, gs])
    check_each_algorithm(device, lambda: run_with_grads(OPS[op], on(device, inputs), *args),
                         want, output_names(op, True), 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_bfloat16_model_like_inputs_T16384(op, device):
    """bfloat16 inputs shaped like a real model (decays >= 0.545), T = 16384 (on a GPU packed
    into uneven sequences), within 2e-2 of a float64 computation. The float64 computation here
    is the float64 CPU kernel, which the reference grid and gradcheck tie to the step-by-step
    reference (that one would take minutes at this length)."""
    B, T, H, N = 1, 16384, 2, 64
    inputs = make_inputs(op, B, T, H, N, dtype=torch.bfloat16, seed=11)
    cu = None if device == "cpu" else torch.tensor([0, 1, 17, 5000, 5001, 12345, T])
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64).bfloat16()
    gs = torch.randn(B if cu is None else len(cu) - 1, H, N, N, generator=g, dtype=torch.float64).float()
    want = run_with_grads(OPS[op], [x.double() for x in inputs], None, cu, gy.double(), gs.double())
    args = on(device, [None, cu, gy, gs])
    check_each_algorithm(device, lambda: run_with_grads(OPS[op], on(device, inputs), *args),
                         want, output_names(op, False), 2e-2)


@pytest.mark.parametrize("op", OP_NAMES)
def test_layouts_noncontiguous_sliced_expanded(op):
    """Transposed, sliced and stride-0 inputs give the same answer as their contiguous copies."""
    B, T, H, N = 2, 11, 3, 32
    base = make_inputs(op, B, T, H, N, seed=3)
    odd = []
    for i, x in enumerate(base):
        if x.dim() == 2:  # u
            odd.append(torch.cat([x, x], dim=1)[:, ::2])  # strided
        elif i == 0:
            odd.append(x.transpose(1, 2).contiguous().transpose(1, 2))  # permuted strides
        elif i == 1:
            odd.append(torch.cat([x, x], dim=-1)[..., :N])  # sliced along N
        elif i == 3:
            odd.append(x[:1].expand(B, T, H, N))  # stride 0 over B
        else:
            odd.append(x)
    contiguous = [x.contiguous() for x in odd]
    s0 = torch.randn(B, H, N, N).transpose(-1, -2)  # non-contiguous state
    a = run_with_grads(OPS[op], odd, s0, None, torch.ones(B, T, H, N), torch.ones(B, H, N, N))
    b = run_with_grads(OPS[op], contiguous, s0.contiguous(), None, torch.ones(B, T, H, N),
                       torch.ones(B, H, N, N))
    for x, y in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("op", OP_NAMES)
def test_empty_sequence(op):
    xs = make_inputs(op, 2, 0, 2, 16)
    s0 = torch.randn(2, 2, 16, 16)
    y, state = OPS[op](*xs, s0)
    assert y.shape == (2, 0, 2, 16)
    torch.testing.assert_close(state, s0, rtol=0, atol=0)
    y, state = OPS[op](*xs)
    assert state.abs().sum() == 0 and state.shape == (2, 2, 16, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_decode_steps_equal_one_pass(op, device, monkeypatch):
    """T = 1 steps carrying the state reproduce one pass over the sequence (2 heads on the CPU,
    3 on a GPU, where the pass uses each algorithm)."""
    for algorithm in [None] if device == "cpu" else GPU_ALGORITHMS:
        if algorithm:
            monkeypatch.setenv("ARWKV_GPU_ALGORITHM", algorithm)
        # (chunked: split-bf16 tensor-core products, each term to ~2^-16)
        check_decode_steps(op, device, 1e-4 if algorithm == "chunked" else 1e-5)


def check_decode_steps(op, device, tol: float) -> None:
    xs = on(device, make_inputs(op, 2, 12, 2 if device == "cpu" else 3, 64, seed=4))
    y_full, s_full = OPS[op](*xs)
    state, ys = None, []
    for t in range(12):
        step = [x[:, t:t + 1] if x.dim() == 4 else x for x in xs]
        y, state = OPS[op](*step, state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=tol, atol=tol)
    torch.testing.assert_close(state, s_full, rtol=tol, atol=tol)


@pytest.mark.parametrize("op", OP_NAMES)
def test_instruction_sets_agree(op, monkeypatch, cpu_algorithm):
    """Every instruction-set path this CPU runs gives the same results (up to float32 rounding)."""
    args = sample_args(op, B=2, T=40, H=3, N=64)
    results = {}
    for isa in arwkv_ext.cpu_isas_supported():
        monkeypatch.setenv("ARWKV_CPU_ISA", isa)
        assert arwkv_ext.cpu_isa() == isa
        y, state = getattr(torch.ops.arwkv, op)(*args)
        grads = torch.autograd.grad(y.sum() + state.sum(), differentiable(args))
        results[isa] = [y, state, *grads]
    first = results["baseline"]
    for isa, outs in results.items():
        for a, b in zip(outs, first, strict=True):
            assert rel_error(a, b) < 1e-5, isa


def test_unknown_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ARWKV_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="ARWKV_CPU_ISA=sse9 is not one of"):
        arwkv_ext.wkv7(*make_inputs("wkv7", 1, 2, 1, 16))


def test_unknown_algorithm_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ARWKV_CPU_ALGORITHM", "fast")
    with pytest.raises(ValueError, match="ARWKV_CPU_ALGORITHM=fast is not one of auto, step, chunked"):
        arwkv_ext.wkv7(*make_inputs("wkv7", 1, 2, 1, 16))


def test_algorithm_selection(monkeypatch):
    monkeypatch.delenv("ARWKV_CPU_ALGORITHM", raising=False)
    assert arwkv_ext.cpu_algorithm("wkv7", "forward") == "step"  # measured faster (make bench)
    assert arwkv_ext.cpu_algorithm("wkv7", "backward") == "chunked"
    assert arwkv_ext.cpu_algorithm("wkv6", "forward") == "chunked"
    for name in CPU_ALGORITHMS:
        monkeypatch.setenv("ARWKV_CPU_ALGORITHM", name)
        assert {arwkv_ext.cpu_algorithm(op, d) for op in OP_NAMES for d in ("forward", "backward")} == {name}
    with pytest.raises(ValueError, match="direction must be"):
        arwkv_ext.cpu_algorithm("wkv7", "sideways")


def test_gpu_algorithm_selection(monkeypatch):
    """ARWKV_GPU_ALGORITHM as the GPU backend reads it (answered on any build)."""
    monkeypatch.delenv("ARWKV_GPU_ALGORITHM", raising=False)
    assert arwkv_ext.gpu_algorithm() == "step"  # opt-in until measured on a GPU
    for value, want in [("auto", "step"), ("step", "step"), ("chunked", "chunked")]:
        monkeypatch.setenv("ARWKV_GPU_ALGORITHM", value)
        assert arwkv_ext.gpu_algorithm() == want
    monkeypatch.setenv("ARWKV_GPU_ALGORITHM", "fast")
    with pytest.raises(ValueError, match="ARWKV_GPU_ALGORITHM=fast is not one of auto, step, chunked"):
        arwkv_ext.gpu_algorithm()


@pytest.mark.parametrize("op", OP_NAMES)
def test_algorithms_agree_at_chunk_edges(op):
    """Step and chunked agree (float32 rounding apart) at lengths around the 16-step chunk and
    the 4-step decoding cut-off, packed into uneven sequences, with an initial state."""
    for T in (4, 5, 15, 16, 17, 31, 33):
        args = sample_args(op, B=1, T=T, H=2, N=32, packed=True)
        results = []
        for algorithm in CPU_ALGORITHMS:
            with pytest.MonkeyPatch.context() as env:
                env.setenv("ARWKV_CPU_ALGORITHM", algorithm)
                y, state = getattr(torch.ops.arwkv, op)(*args)
                grads = torch.autograd.grad((y * y).sum() + state.sum(), differentiable(args))
            results.append([y, state, *grads])
        for name, a, b in zip(output_names(op, True), *results, strict=True):
            assert rel_error(a, b) < 1e-5, f"T={T} {name}: {rel_error(a, b):.2e}"


def test_thread_counts_agree(cpu_algorithm):
    """Splitting value rows across threads (few heads) does not change the results."""
    args = sample_args("wkv7", B=1, T=33, H=1, N=128)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 8):
            torch.set_num_threads(threads)
            y, state = torch.ops.arwkv.wkv7(*args)
            outs.append([y, state, *torch.autograd.grad(y.sum() + state.sum(), differentiable(args))])
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        for a, b in zip(other, outs[0], strict=True):
            assert rel_error(a, b) < 1e-6


def test_build_info_recorded():
    info = arwkv_ext.build_info
    assert info["torch"] == torch.__version__
    assert "cpu" in info["kernels"] and info["cpu_isas"]
    assert os.environ.get("ARWKV_CPU_ISA") or arwkv_ext.cpu_isa() == arwkv_ext.cpu_isas_supported()[-1]
