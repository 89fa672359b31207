"""Stage 1 (attention alignment): right losses and gradients (against a computation that keeps
every graph), only time mixers train, it learns, and memory does not grow with depth."""

from __future__ import annotations

import math

import pytest
import torch

from arwkv.conversion.convert import student_from_teacher
from arwkv.training.losses import AttentionAligner, alignment_losses_keeping_graphs
from arwkv_ext.testing import rel_error
from fixtures import VOCAB, time_mixer_parameters, tiny_teacher


def pair(layers: int = 3, width: int = 128, wkv_layers=None, seed: int = 0, wkv: int = 7):
    teacher = tiny_teacher(tie=False, seed=seed, hidden=width, intermediate=2 * width, layers=layers)
    student = student_from_teacher(teacher, head_size=32, wkv_layers=wkv_layers, wkv=wkv)
    for p in student.parameters():  # a student that does not already match at init
        p.data.add_(torch.randn_like(p) * 0.02)
    return teacher, student


@pytest.mark.parametrize("wkv_layers,wkv", [(None, 7), ([1, 2], 7), (None, 6)])
def test_stage1_losses_and_gradients_match_keeping_every_graph(wkv_layers, wkv):
    teacher, student = pair(wkv_layers=wkv_layers, wkv=wkv)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[0, :5] = 0  # left padding does not count
    losses = AttentionAligner(teacher, student).step(ids, mask)
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    want_losses = alignment_losses_keeping_graphs(teacher, student, ids, mask)
    (torch.stack(want_losses).mean()).backward()
    assert losses == pytest.approx([x.item() for x in want_losses], rel=1e-5)
    want = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and all("time_mixer" in n for n in got)
    # every time-mixer parameter trains, but the value-residual ones of RWKV-7's first time-mixing
    # layer (it makes v_first and has no residual)
    assert len(got) == len(time_mixer_parameters(student)) - (3 if wkv == 7 else 0)
    for n in got:
        assert rel_error(got[n], want[n]) <= 1e-5, n
    assert all(p.grad is None for n, p in teacher.named_parameters())


def test_stage1_learns():
    teacher, student = pair(layers=2)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    aligner = AttentionAligner(teacher, student, loss="mse")
    opt = torch.optim.AdamW(time_mixer_parameters(student), lr=3e-3)
    first = sum(aligner.step(ids))
    for _ in range(30):
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = sum(aligner.step(ids))
    assert last < 0.5 * first, (first, last)


class _Saved:
    """A tensor autograd saved; its storage counts once however many times it is saved, and
    stops counting when autograd has let go of every copy."""

    def __init__(self, t: torch.Tensor, tracker: dict) -> None:
        self.t, self.tracker = t, tracker
        self.key = t.untyped_storage().data_ptr()
        refs = tracker["refs"]
        if refs.get(self.key, 0) == 0:
            tracker["alive"] += t.untyped_storage().nbytes()
            tracker["peak"] = max(tracker["peak"], tracker["alive"])
        refs[self.key] = refs.get(self.key, 0) + 1
        self.nbytes = t.untyped_storage().nbytes()

    def __del__(self) -> None:
        refs = self.tracker["refs"]
        refs[self.key] -= 1
        if refs[self.key] == 0:
            self.tracker["alive"] -= self.nbytes


def peak_saved_bytes(fn) -> int:
    """Largest number of bytes of distinct storages autograd held saved for backward at once
    while fn() ran."""
    tracker = {"alive": 0, "peak": 0, "refs": {}}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(t, tracker), lambda box: box.t):
        fn()
    return tracker["peak"]


def test_stage1_memory_does_not_grow_with_depth():
    """Bytes the student's autograd graphs hold at their peak: about one layer's, at any depth
    (keeping every layer's graph, as a plain loss sum does, grows with the depth)."""
    peaks, naive = {}, {}
    for layers in (2, 8):
        teacher, student = pair(layers=layers, width=128)
        ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(3))
        peaks[layers] = peak_saved_bytes(lambda t=teacher, s=student, i=ids: AttentionAligner(t, s).step(i))
        naive[layers] = peak_saved_bytes(lambda t=teacher, s=student, i=ids: torch.stack(
            alignment_losses_keeping_graphs(t, s, i)).mean().backward())
    assert peaks[8] < 1.2 * peaks[2], peaks
    assert naive[8] > 3 * naive[2], naive  # the measure sees depth when graphs are kept


def test_bad_options():
    teacher, student = pair(layers=2)
    with pytest.raises(ValueError, match="'rms' or 'mse'"):
        AttentionAligner(teacher, student, loss="l1")


@pytest.mark.parametrize("temperature,chunk", [(1.0, 5), (2.0, 64)])
def test_chunked_kl_equals_the_full_computation(temperature, chunk):
    """Value and gradients equal KL(teacher || student) computed on full logits, with a mask."""
    from arwkv.training.losses import chunked_kl

    g = torch.Generator().manual_seed(4)
    N, C, V = 37, 16, 50
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64).requires_grad_()
    head = torch.randn(V, C, generator=g, dtype=torch.float64).requires_grad_()
    t_hidden = torch.randn(N, 24, generator=g, dtype=torch.float64)
    t_head = torch.randn(V + 6, 24, generator=g, dtype=torch.float64)  # a larger teacher vocabulary
    teacher = (t_hidden @ t_head.t())[:, :V]  # truncated to the student's, as the paper did
    mask = (torch.rand(N, generator=g) > 0.3).long()
    got = chunked_kl(hidden, head, t_hidden, t_head, mask, temperature, chunk)
    got_grads = torch.autograd.grad(got, [hidden, head])
    s = torch.log_softmax(hidden @ head.t() / temperature, -1)
    t = torch.log_softmax(teacher / temperature, -1)
    per_token = (t.exp() * (t - s)).sum(-1)
    want = (per_token * mask).sum() / mask.sum() * temperature**2
    want_grads = torch.autograd.grad(want, [hidden, head])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert rel_error(a, b) <= 1e-5


def naive_adaptive_kl(p: list[float], q: list[float], head: float) -> float:
    """Adaptive KL of one token, written out: the teacher's tokens by falling probability go to the
    head while the mass before them is short of ``head``."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    in_head, mass = set(), 0.0
    for i in order:
        if mass < head:
            in_head.add(i)
        mass += p[i]
    g_head = sum(abs(p[i] - q[i]) for i in in_head)
    g_tail = sum(abs(p[i] - q[i]) for i in range(len(p)) if i not in in_head)
    fkl = sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p)))
    rkl = sum(q[i] * math.log(q[i] / p[i]) for i in range(len(p)))
    return (g_head * fkl + g_tail * rkl) / (g_head + g_tail)


@pytest.mark.parametrize("head", [0.2, 0.5, 0.9])
def test_adaptive_kl_matches_its_definition(head):
    from arwkv.training.losses import adaptive_kl

    g = torch.Generator().manual_seed(7)
    t = torch.log_softmax(torch.randn(9, 13, generator=g, dtype=torch.float64) * 2, -1)
    s = torch.log_softmax(torch.randn(9, 13, generator=g, dtype=torch.float64) * 2, -1)
    got = adaptive_kl(t, s, head)
    for n in range(9):
        want = naive_adaptive_kl(t[n].exp().tolist(), s[n].exp().tolist(), head)
        assert got[n].item() == pytest.approx(want, rel=1e-10)
    assert torch.allclose(adaptive_kl(t, t, head), torch.zeros(9, dtype=torch.float64))  # no gap, no loss
    forward = (t.exp() * (t - s)).sum(-1)
    torch.testing.assert_close(adaptive_kl(t, s, 1.0), forward)  # all head: forward KL


def test_chunked_adaptive_kl_equals_the_full_computation():
    """Chunks, the mask and the recomputation in the backward give the full computation's value
    and gradients (the per-token weights carry no gradient)."""
    from arwkv.training.losses import adaptive_kl, chunked_logit_losses

    g = torch.Generator().manual_seed(5)
    N, C, V = 29, 8, 40
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64).requires_grad_()
    head = torch.randn(V, C, generator=g, dtype=torch.float64).requires_grad_()
    t_hidden, t_head = torch.randn(N, 12, generator=g, dtype=torch.float64), torch.randn(V, 12, generator=g,
                                                                                          dtype=torch.float64)
    mask = (torch.rand(N, generator=g) > 0.3).long()
    got, _ = chunked_logit_losses(hidden, head, t_hidden, t_head, mask, temperature=1.5, chunk=6,
                                  kind="adaptive", head=0.4)
    got_grads = torch.autograd.grad(got, [hidden, head])
    s = torch.log_softmax(hidden @ head.t() / 1.5, -1)
    t = torch.log_softmax(t_hidden @ t_head.t() / 1.5, -1)
    want = (adaptive_kl(t, s, 0.4) * mask).sum() / mask.sum() * 1.5**2
    want_grads = torch.autograd.grad(want, [hidden, head])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert rel_error(a, b) <= 1e-5


def test_chunked_kl_holds_one_chunk_of_logits():
    """Saved-for-backward bytes peak at one chunk's logits (while that chunk is recomputed in the
    backward), whatever the number of tokens; the plain computation saves several [N, V]."""
    from arwkv.training.losses import _kl_chunk, chunked_kl

    C, V, chunk = 32, 4000, 128
    peaks, naive = {}, {}
    for N in (256, 2048):
        hidden = torch.randn(N, C, requires_grad=True)
        head = torch.randn(V, C, requires_grad=True)
        t_hidden, t_head = torch.randn(N, C), torch.randn(V, C)
        peaks[N] = peak_saved_bytes(lambda h=hidden, w=head, th=t_hidden, tw=t_head: chunked_kl(
            h, w, th, tw, chunk=chunk).backward())
        naive[N] = peak_saved_bytes(lambda h=hidden, w=head, th=t_hidden, tw=t_head: _kl_chunk(
            h, w, th, tw, 1.0)[0].backward())
    # growth = the hidden states themselves (student's and teacher's, N x C each), nothing V-wide
    assert peaks[2048] - peaks[256] <= 1.05 * 2 * (2048 - 256) * C * 4, peaks
    assert peaks[2048] < 8 * chunk * V * 4 and naive[2048] > 2048 * V * 4, (peaks, naive)


def test_chunked_cross_entropy_equals_the_full_computation():
    """The optional CE term: the mean next-token cross-entropy over the targets that are not
    -100, from the same chunks (so logits are made once for KL and CE)."""
    from arwkv.training.losses import chunked_logit_losses, next_token_targets

    g = torch.Generator().manual_seed(5)
    B, T, C, V = 3, 11, 16, 50
    hidden = torch.randn(B * T, C, generator=g, dtype=torch.float64).requires_grad_()
    head = torch.randn(V, C, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100
    targets = next_token_targets(labels)
    assert targets[:, -1].eq(-100).all() and targets[:, :-1].equal(labels[:, 1:])
    _, ce = chunked_logit_losses(hidden, head, torch.randn(B * T, 8, dtype=torch.float64),
                                 torch.randn(V, 8, dtype=torch.float64), targets=targets.reshape(-1), chunk=7)
    want = torch.nn.functional.cross_entropy(hidden @ head.t(), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ce.double(), want, rtol=1e-6, atol=1e-8)
    for a, b in zip(torch.autograd.grad(ce, [hidden, head]), torch.autograd.grad(want, [hidden, head]),
                    strict=True):
        assert rel_error(a, b) <= 1e-5
