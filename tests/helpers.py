"""Shared by the tests: the ops and references by name, and run_with_grads (from arwkv_ext.testing,
where the benchmark uses it too)."""

from __future__ import annotations

import arwkv_ext
from arwkv_ext.reference import wkv6_reference, wkv7_reference
from arwkv_ext.testing import run_with_grads

OPS = {"wkv7": arwkv_ext.wkv7, "wkv6": arwkv_ext.wkv6}
REFERENCES = {"wkv7": wkv7_reference, "wkv6": wkv6_reference}

__all__ = ["OPS", "REFERENCES", "run_with_grads"]
