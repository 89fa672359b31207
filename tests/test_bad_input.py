"""Every misuse is one Python exception whose message names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import arwkv_ext
from arwkv_ext.testing import make_inputs

B, T, H, N = 1, 6, 2, 16


def wkv7_args():
    return make_inputs("wkv7", B, T, H, N)


def replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


CASES = [
    ("w shape", lambda a: arwkv_ext.wkv7(*replace(a, 1, a[1][..., :8])), ValueError,
     r"w has shape \[1, 6, 2, 8\] but r has \[1, 6, 2, 16\]"),
    ("r not 4-D", lambda a: arwkv_ext.wkv7(*replace(a, 0, a[0][0])), ValueError,
     r"r has shape \[6, 2, 16\]; expected 4 dimensions \[B, T, H, N\]"),
    ("mixed dtypes", lambda a: arwkv_ext.wkv7(*replace(a, 2, a[2].half())), TypeError,
     r"k has dtype torch.float16 but r has torch.float32"),
    ("integer input", lambda a: arwkv_ext.wkv7(*replace(a, 3, a[3].long())), TypeError,
     r"v has dtype torch.int64; expected float32, bfloat16, float16 or float64"),
    ("integer r", lambda a: arwkv_ext.wkv7(*replace(a, 0, a[0].int())), TypeError,
     r"r has dtype torch.int32"),
    ("unsupported N", lambda a: arwkv_ext.wkv7(*make_inputs("wkv7", B, T, H, 48)), ValueError,
     r"head size N = 48 .* expected one of " + ", ".join(map(str, arwkv_ext.HEAD_SIZES))),
    ("different devices", lambda a: arwkv_ext.wkv7(*replace(a, 4, a[4].to("meta"))), ValueError,
     r"a is on meta but r is on cpu"),
    ("initial_state shape", lambda a: arwkv_ext.wkv7(*a, initial_state=torch.zeros(B, H, N, N + 1)),
     ValueError,
     r"initial_state has shape \[1, 2, 16, 17\]; expected \[1, 2, 16, 16\]"),
    ("initial_state dtype", lambda a: arwkv_ext.wkv7(*a, initial_state=torch.zeros(B, H, N, N).bfloat16()),
     TypeError, r"initial_state has dtype torch.bfloat16; the state is torch.float32"),
    ("cu_seqlens with B > 1", lambda a: arwkv_ext.wkv7(*make_inputs("wkv7", 2, T, H, N),
                                                        cu_seqlens=torch.tensor([0, T])), ValueError,
     r"cu_seqlens .* requires B = 1, but r has B = 2"),
    ("cu_seqlens not from 0", lambda a: arwkv_ext.wkv7(*a, cu_seqlens=torch.tensor([1, T])), ValueError,
     r"cu_seqlens must start at 0, got 1"),
    ("cu_seqlens not increasing", lambda a: arwkv_ext.wkv7(*a, cu_seqlens=torch.tensor([0, 4, 4, T])),
     ValueError, r"cu_seqlens must be strictly increasing, but c\[2\] = 4 after c\[1\] = 4"),
    ("cu_seqlens decreasing", lambda a: arwkv_ext.wkv7(*a, cu_seqlens=torch.tensor([0, 5, 3, T])),
     ValueError, r"strictly increasing"),
    ("cu_seqlens not ending at T", lambda a: arwkv_ext.wkv7(*a, cu_seqlens=torch.tensor([0, 2, 5])),
     ValueError, r"cu_seqlens must end at T = 6, got 5"),
    ("cu_seqlens float", lambda a: arwkv_ext.wkv7(*a, cu_seqlens=torch.tensor([0.0, 6.0])), TypeError,
     r"cu_seqlens has dtype torch.float32; expected int32 or int64"),
    ("cu_seqlens 2-D", lambda a: arwkv_ext.wkv7(*a, cu_seqlens=torch.tensor([[0, 6]])), ValueError,
     r"cu_seqlens has shape \[1, 2\]; expected \[S \+ 1\] offsets"),
    ("states vs sequences", lambda a: arwkv_ext.wkv7(*a, initial_state=torch.zeros(2, H, N, N),
                                                      cu_seqlens=torch.tensor([0, 2, 4, T])), ValueError,
     r"initial_state has shape \[2, 2, 16, 16\]; expected \[3, 2, 16, 16\] .*one state per packed sequence"),
    ("u shape", lambda a: arwkv_ext.wkv6(*a[:4], torch.zeros(H, N + 1)), ValueError,
     r"u has shape \[2, 17\]; expected \[H, N\] = \[2, 16\]"),
    ("u dtype", lambda a: arwkv_ext.wkv6(*a[:4], torch.zeros(H, N, dtype=torch.float64)), TypeError,
     r"u has dtype torch.float64 but r has torch.float32"),
    ("backward grad_y shape",
     lambda a: torch.ops.arwkv.wkv7_backward(*a, None, None, torch.zeros(1, 2, 3, 4), None), ValueError,
     r"grad_y has shape \[1, 2, 3, 4\]; expected \[1, 6, 2, 16\]"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_message(call, error, message):
    with pytest.raises(error, match=message) as info:
        call(wkv7_args())
    text = str(info.value)
    assert "\n" not in text.strip(), f"message is not one line: {text!r}"
    assert text.startswith("arwkv."), text


def test_error_also_raised_under_fake_tensors():
    """Shape checks run in the fake (meta) implementation too, so torch.compile reports them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = [mode.from_tensor(x) for x in wkv7_args()]
        with pytest.raises(ValueError, match="w has shape"):
            torch.ops.arwkv.wkv7(args[0], args[1][..., :8], *args[2:])
