"""arwkv.files: outputs appear whole or not at all, with the modes the user's umask gives."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from arwkv.files import atomic_directory, write_atomic


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_atomic_follows_umask(tmp_path, umask):
    out = write_atomic(tmp_path / "report.json", "{}\n")
    assert out.read_text() == "{}\n"
    assert mode(out) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_directory_modes_and_replace(tmp_path, umask):
    final = tmp_path / "student"
    with atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("{}")
        save_file({"x": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
        assert not final.exists()
    assert mode(final) == 0o777 & ~umask
    for name in ("config.json", "model.safetensors"):
        assert mode(final / name) == 0o666 & ~umask
    with atomic_directory(final) as tmp:
        (tmp / "new.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_atomic_directory_failure_leaves_nothing(tmp_path):
    final = tmp_path / "student"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []
