"""Conversion time and peak memory at Qwen2.5-0.5B's real shape.

Writes a random bf16 checkpoint with Qwen2.5-0.5B's config (hidden 896, intermediate 4864, 24
layers, 14 heads, 2 kv heads, vocab 151936, tied embeddings, q/k/v biases, rope_theta 1e6),
sharded like the hub's, then times `arwkv convert` on it under /usr/bin/time -v:

    python benchmarks/bench_convert.py [--workdir DIR] [--keep]

Goal: under 60 s and under 2.5 GB peak memory on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from arwkv.cli import RawDescriptionDefaultsFormatter

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                  torch_dtype="bfloat16")


def write_teacher(path: Path, shard_bytes: int = 400_000_000) -> int:
    """A random bf16 checkpoint with the real names and shapes, written shard by shard."""
    config = Qwen2Config(**QWEN25_05B)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Qwen2ForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied: the hub checkpoint has no lm_head tensor
    g = torch.Generator().manual_seed(0)
    shards, shard, size, weight_map, total = [], {}, 0, {}, 0
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if shard and size + t.numel() * 2 > shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    shards.append(shard)
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(path)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsFormatter)
    ap.add_argument("--workdir", type=Path,
                    help="where to write (default: arwkv-bench-convert-PID in the temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    # not tempfile.mkdtemp: that directory would be private (0700); a kept one follows the umask
    work = args.workdir or Path(tempfile.gettempdir()) / f"arwkv-bench-convert-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    teacher, student = work / "teacher", work / "student"
    teacher.mkdir(exist_ok=True)
    total = write_teacher(teacher)
    print(f"teacher: {total / 1e9:.2f} GB bf16 in {len(list(teacher.glob('*.safetensors')))} shards")
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "arwkv.cli", "convert", "--teacher", str(teacher),
           "--out", str(student), "--overwrite"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        print(run.stdout, run.stderr, file=sys.stderr)
        return 1
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", run.stderr).group(1)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    out_bytes = sum(f.stat().st_size for f in student.glob("*.safetensors"))
    print(run.stdout.strip())
    print(f"convert: {seconds:.1f} s wall, peak RSS {peak_kb / 1e6:.2f} GB, student {out_bytes / 1e9:.2f} GB "
          f"(goals: < 60 s, < 2.5 GB)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
