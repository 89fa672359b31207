"""The GPU kernels (CUDA or ROCm) against the float64 reference and the CPU kernel, over the same
grid as the CPU tests, through both algorithms (ARWKV_GPU_ALGORITHM=step|chunked), plus the
GPU-specific paths: row bands split across blocks (few heads), layouts, streams. Skipped
without a GPU build and a GPU. (Long sequences with extreme decays, and decoding step by step,
run on every device in test_ops.py, there too through both algorithms.)"""

from __future__ import annotations

import pytest
import torch

import arwkv_ext
from arwkv_ext.testing import make_inputs, rel_error, run_with_grads
from fixtures import (
    DTYPES,
    NEEDS_GPU,
    OP_NAMES,
    OPS,
    REFERENCES,
    TOLERANCE,
    flat,
    on,
    output_names,
    reference,
    reference_params,
)

pytestmark = NEEDS_GPU
DEV = "cuda"
# GPU against the CPU kernel, same inputs and dtype: float32 differs only by summation order;
# 16-bit outputs may round to the neighbouring value. The chunked kernels' products are split
# bf16 tensor-core products (each term to ~2^-16): float32 agrees to the op's contract, 1e-4.
CPU_AGREEMENT = {
    "step": {"float32": 2e-5, "bfloat16": 8e-3, "float16": 8e-3},
    "chunked": {"float32": 1e-4, "bfloat16": 8e-3, "float16": 8e-3},
}


@pytest.mark.parametrize(("op", "N", "T", "with_state", "packed"), reference_params())
def test_gpu_matches_reference_and_cpu(op, N, T, with_state, packed, gpu_algorithm):
    """The CPU grid (every dtype, and gradients from y, from final_state, from both) on the
    GPU, both algorithms, against the float64 reference and against the CPU kernel. One test per
    reference and algorithm, so parallel workers never recompute one. By default the references
    of the CPU grid's default tier; `make test-full` all of them."""
    agreement = CPU_AGREEMENT[gpu_algorithm]
    inputs64, s0, cu, gy_all, gs_all, y_ref, state_ref, g_y, g_s = reference(op, N, T, with_state, packed)
    failures = []
    for dtype in DTYPES:
        inputs = [x.to(DTYPES[dtype]) for x in inputs64]
        for grads_from in ("y", "state", "both"):
            use_y, use_s = grads_from in ("y", "both"), grads_from in ("state", "both")
            gy, gs = (gy_all if use_y else None), (gs_all if use_s else None)
            y, state, grads = run_with_grads(OPS[op], on(DEV, inputs), *on(DEV, [s0, cu, gy, gs]))
            assert y.device.type == "cuda" and y.dtype == inputs[0].dtype and state.dtype == torch.float32
            y_cpu, state_cpu, grads_cpu = run_with_grads(OPS[op], inputs, s0, cu, gy, gs)
            expected = [(a if use_y else 0) + (b if use_s else 0) for a, b in zip(g_y, g_s, strict=True)]
            checks = zip(output_names(op, s0 is not None), [y, state, *grads], [y_ref, state_ref, *expected],
                         [y_cpu, state_cpu, *grads_cpu], strict=True)
            for name, x, want, x_cpu in checks:
                where = f"{dtype}, grads from {grads_from}, {name}"
                if not torch.isfinite(x).all():
                    failures.append(f"{where}: NaN/Inf")
                    continue
                if not isinstance(want, int) and (err := rel_error(x, want)) > TOLERANCE[dtype]:
                    failures.append(f"{where}: error vs float64 {err:.2e} > {TOLERANCE[dtype]:.0e}")
                if (agree := rel_error(x, x_cpu)) > agreement[dtype]:
                    failures.append(f"{where}: GPU vs CPU kernel {agree:.2e} > {agreement[dtype]:.0e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("B,H,N", [(1, 1, 128), (1, 2, 64), (1, 3, 32), (3, 1, 16), (2, 40, 64)])
@pytest.mark.parametrize("op", OP_NAMES)
def test_gpu_row_splits_and_head_counts(op, B, H, N, gpu_algorithm):
    """Few heads (rows split over many narrow blocks) and many heads (wide blocks) both agree
    with the CPU kernel."""
    T = 77
    xs = make_inputs(op, B, T, H, N, seed=B * 100 + H)
    s0 = torch.randn(B, H, N, N) * 0.3
    gy, gs = torch.randn(B, T, H, N), torch.randn(B, H, N, N)
    got = run_with_grads(OPS[op], on(DEV, xs), *on(DEV, [s0, None, gy, gs]))
    want = run_with_grads(OPS[op], xs, s0, None, gy, gs)
    tol = CPU_AGREEMENT[gpu_algorithm]["float32"]
    for name, a, b in zip(output_names(op, True), flat(got), flat(want), strict=True):
        assert rel_error(a, b) <= tol, f"{name}: {rel_error(a, b):.2e}"


@pytest.mark.parametrize("op", OP_NAMES)
def test_gpu_layouts_empty_and_stream(op, gpu_algorithm):
    """Strided inputs, T = 0, and a side stream give the same answers as the plain call."""
    B, T, H, N = 2, 11, 3, 32
    xs = on(DEV, make_inputs(op, B, T, H, N, seed=3))
    odd = [torch.cat([x, x], dim=-1)[..., :N] if x.dim() == 4 else x for x in xs]
    s0 = torch.randn(B, H, N, N, device=DEV).transpose(-1, -2)
    gy, gs = torch.ones(B, T, H, N, device=DEV), torch.ones(B, H, N, N, device=DEV)
    a = run_with_grads(OPS[op], odd, s0, None, gy, gs)
    b = run_with_grads(OPS[op], [x.contiguous() for x in odd], s0.contiguous(), None, gy, gs)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        c = run_with_grads(OPS[op], xs, s0.contiguous(), None, gy, gs)
    side.synchronize()
    for x, y, z in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]], [c[0], c[1], *c[2]], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(x, z, rtol=0, atol=0)
    empty = on(DEV, make_inputs(op, 2, 0, 2, 16))
    s = torch.randn(2, 2, 16, 16, device=DEV)
    y, state = OPS[op](*empty, s)
    assert y.shape == (2, 0, 2, 16)
    torch.testing.assert_close(state, s, rtol=0, atol=0)


@pytest.mark.parametrize("op", OP_NAMES)
def test_gpu_opcheck_and_compile(op, gpu_algorithm):
    xs = [x.requires_grad_() for x in on(DEV, make_inputs(op, 1, 9, 2, 32, dtype=torch.bfloat16, seed=2))]
    s0 = torch.randn(1, 2, 32, 32, device=DEV, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.arwkv, op).default, (*xs, s0, None))

    def model(*args):
        y, state = OPS[op](*args)
        return y.float().square().sum() + state.square().sum()

    eager = torch.autograd.grad(model(*xs, s0), [*xs, s0])
    got = torch.autograd.grad(torch.compile(model, fullgraph=True)(*xs, s0), [*xs, s0])
    for g, e in zip(got, eager, strict=True):
        torch.testing.assert_close(g, e)


def test_gpu_unknown_algorithm_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ARWKV_GPU_ALGORITHM", "fast")
    xs = on(DEV, make_inputs("wkv7", 1, 2, 1, 16))
    with pytest.raises(ValueError, match="ARWKV_GPU_ALGORITHM=fast is not one of auto, step, chunked"):
        arwkv_ext.wkv7(*xs)


def test_gpu_float64_is_a_clear_error():
    xs = on(DEV, make_inputs("wkv7", 1, 2, 1, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64 inputs are supported on CPU only"):
        arwkv_ext.wkv7(*xs)


def test_gpu_reference_runs_on_device():
    """The step-by-step reference works on GPU tensors too (for users comparing there)."""
    xs = on(DEV, make_inputs("wkv7", 1, 5, 1, 16, seed=9))
    y, state = REFERENCES["wkv7"](*xs)
    y2, state2 = OPS["wkv7"](*xs)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state2, rtol=1e-5, atol=1e-5)
