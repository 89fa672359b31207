"""A student exported by `arwkv export --gguf`, run by llama.cpp itself: the same tokens through
arwkv (float32) and through llama.cpp (its arwkv7 architecture for RWKV-7 students, rwkv6qwen2
for RWKV-6 ones) for each --outtype, compared on logits, greedy tokens and perplexity; and
llama.cpp's tokenization of held-out text against transformers'.

    python benchmarks/llama_cpp_check.py                      # builds llama.cpp once (8-15 min on 2 cores)
    python benchmarks/llama_cpp_check.py --llama-build DIR    # reuse a build (its bin/ has libllama.so)
    python benchmarks/llama_cpp_check.py --model STUDENT_DIR  # another student (default: the demo
                                                              # teacher converted with --head-size 64)
    python benchmarks/llama_cpp_check.py --wkv 6              # that default student as RWKV-6

llama.cpp comes from the source package of its Python binding (llama_cpp_python on PyPI, which
vendors llama.cpp), built as a shared library with its CPU backend; a 40-line C++ program in
this script (written next to the build) loads a GGUF through llama.h and writes the logits of
given token ids, or the ids llama.cpp's tokenizer gives a text. Not part of the test suite.
Results: --out (default benchmarks/results/llama-cpp/) gets results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "python" / "arwkv" / "demo_assets" / "teacher"
HELDOUT = ROOT / "python" / "arwkv" / "demo_assets" / "heldout.jsonl"
SDIST = "llama_cpp_python==0.3.36"

DUMP_CPP = r"""
// logits:   dump MODEL.gguf IDS.i32 OUT.f32 [THREADS]  (one batch; logits of every position)
// tokenize: dump MODEL.gguf --tokenize TEXT.txt OUT.i32
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
static std::vector<char> slurp(const char* path) {
  std::vector<char> d; FILE* f = fopen(path, "rb"); if (!f) return d;
  char buf[1 << 16]; size_t n; while ((n = fread(buf, 1, sizeof buf, f)) > 0) d.insert(d.end(), buf, buf + n);
  fclose(f); return d;
}
int main(int argc, char** argv) {
  if (argc < 4) { fprintf(stderr, "usage: see the header\n"); return 2; }
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
  const llama_vocab* vocab = llama_model_get_vocab(model);
  if (strcmp(argv[2], "--tokenize") == 0) {
    std::vector<char> text = slurp(argv[3]);
    std::vector<llama_token> ids(text.size() + 8);
    int n = llama_tokenize(vocab, text.data(), (int)text.size(), ids.data(), (int)ids.size(), false, false);
    if (n < 0) { fprintf(stderr, "tokenize failed\n"); return 1; }
    FILE* f = fopen(argv[4], "wb"); fwrite(ids.data(), sizeof(llama_token), n, f); fclose(f);
    return 0;
  }
  std::vector<char> raw = slurp(argv[2]);
  const int n = (int)(raw.size() / sizeof(llama_token));
  std::vector<llama_token> ids(n); memcpy(ids.data(), raw.data(), n * sizeof(llama_token));
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = n; cp.n_batch = n; cp.n_ubatch = n;
  cp.n_threads = cp.n_threads_batch = argc > 4 ? atoi(argv[4]) : 2;
  llama_context* ctx = llama_init_from_model(model, cp);
  llama_batch b = llama_batch_init(n, 0, 1);
  for (int i = 0; i < n; ++i) {
    b.token[i] = ids[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
  }
  b.n_tokens = n;
  if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
  const int nv = llama_vocab_n_tokens(vocab);
  FILE* f = fopen(argv[3], "wb");
  for (int i = 0; i < n; ++i) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), nv, f);
  fclose(f);
  llama_batch_free(b); llama_free(ctx); llama_model_free(model);
  return 0;
}
"""


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def build_llama(build: Path) -> tuple[Path, Path]:
    """(llama.cpp source, build with bin/libllama.so): reused when present, else built."""
    src_root = build / "src"
    sources = list(src_root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not sources:
        src_root.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", str(src_root), SDIST])
        with tarfile.open(next(src_root.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(src_root, filter="data")
        sources = list(src_root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    source, out = sources[0], build / "cmake"
    if not (out / "bin" / "libllama.so").exists():
        # -march=native turns on AMX where the CPU has it; a kernel (or sandbox) that has not
        # enabled AMX's register state then kills q8_0 matmuls with SIGILL. AMX changes speed only.
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        run(["cmake", "-S", str(source), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
             f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}",
             "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_CURL=OFF"])
        run(["cmake", "--build", str(out), "--target", "llama", "-j", str(os.cpu_count() or 2)])
    return source, out


def dump_tool(source: Path, lib_dir: Path, where: Path) -> Path:
    exe = where / "arwkv_llama_dump"
    cpp = where / "arwkv_llama_dump.cpp"
    cpp.write_text(DUMP_CPP)
    run(["c++", "-O2", "-std=c++17", str(cpp), "-o", str(exe), f"-I{source / 'include'}",
         f"-I{source / 'ggml' / 'include'}", f"-L{lib_dir}", "-lllama", f"-Wl,-rpath,{lib_dir}"])
    return exe


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token negative log-likelihood of ids[1:] under logits[:-1] (float64)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-build", type=Path, default=ROOT / "build" / "llama.cpp",
                    help="where llama.cpp is (or gets) built; a directory with bin/libllama.so is used as is")
    ap.add_argument("--model", type=Path, help="student to export (default: demo teacher -> head size 64)")
    ap.add_argument("--wkv", type=int, choices=(7, 6), default=7,
                    help="time mixing of the default student (RWKV-6: arwkv convert's default qrwkv form)")
    ap.add_argument("--tokens", type=int, default=512, help="held-out tokens scored")
    ap.add_argument("--outtypes", default="f32,f16,bf16,q8_0")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llama-cpp")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from arwkv.conversion.convert import convert_checkpoint
    from arwkv.export.gguf import export_gguf
    from arwkv.models.modeling_rwkv_hybrid import RwkvHybridForCausalLM

    work = Path(tempfile.mkdtemp(prefix="arwkv-llama-"))
    if (args.llama_build / "bin" / "libllama.so").exists():  # a build given as is
        lib_dir = args.llama_build / "bin"
        source = Path(json.loads((args.llama_build / "compile_commands.json").read_text())[0]["file"])
        source = next(p for p in source.parents if (p / "include" / "llama.h").exists())
    else:
        t0 = time.perf_counter()
        source, build = build_llama(args.llama_build)
        lib_dir = build / "bin"
        print(f"llama.cpp built in {time.perf_counter() - t0:.0f} s")
    exe = dump_tool(source, lib_dir, work)

    model_dir = args.model
    if model_dir is None:
        model_dir = work / "student"
        convert_checkpoint(DEMO_TEACHER, model_dir, head_size=64, dtype="fp32", wkv=args.wkv)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    text = "\n".join(json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()[:200])
    ids = np.array(tok(text)["input_ids"][: args.tokens], dtype=np.int32)
    used_text = tok.decode(ids.tolist())
    model = RwkvHybridForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids.astype(np.int64))[None], use_cache=False).logits[0].numpy()
    default = f"demo teacher, arwkv convert --head-size 64 --wkv {args.wkv} (transfer init)"
    from arwkv.export.gguf import ARCHES

    results = {"model": str(args.model or default), "architecture": ARCHES[model.config.wkv_version],
               "llama_cpp": SDIST + " (vendored llama.cpp)", "tokens": int(len(ids)),
               "arwkv": {"ppl": math.exp(nll(ref, ids))}, "outtypes": {}}

    (work / "text.txt").write_text(used_text)
    for outtype in args.outtypes.split(","):
        gguf_path = work / f"student-{outtype}.gguf"
        export_gguf(model_dir, gguf_path, outtype=outtype)
        if outtype == "f32":  # llama.cpp's tokenizer on the same text
            run([str(exe), str(gguf_path), "--tokenize", str(work / "text.txt"), str(work / "ll_ids.i32")])
            ll_ids = np.fromfile(work / "ll_ids.i32", dtype=np.int32)
            hf_ids = np.array(tok(used_text)["input_ids"], dtype=np.int32)
            results["tokenization"] = {"equal": bool(np.array_equal(ll_ids, hf_ids)),
                                       "llama_cpp_tokens": int(len(ll_ids)),
                                       "transformers_tokens": int(len(hf_ids))}
        ids.tofile(work / "ids.i32")
        t0 = time.perf_counter()
        run([str(exe), str(gguf_path), str(work / "ids.i32"), str(work / "logits.f32"), "2"])
        got = np.fromfile(work / "logits.f32", dtype=np.float32).reshape(len(ids), -1)
        results["outtypes"][outtype] = {
            "file_mb": round(gguf_path.stat().st_size / 1e6, 2),
            "max_abs_logit_diff": float(np.abs(got - ref).max()),
            "greedy_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "ppl": math.exp(nll(got, ids)), "seconds": round(time.perf_counter() - t0, 2)}
        print(outtype, results["outtypes"][outtype], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# arwkv vs llama.cpp ({results['llama_cpp']}), {results['tokens']} held-out tokens",
             "", f"Student: {results['model']}, as llama.cpp's `{results['architecture']}` architecture. "
             f"arwkv float32 perplexity: {results['arwkv']['ppl']:.6g}.",
             f"Tokenization of the same text, llama.cpp vs transformers: {results.get('tokenization')}", "",
             "| GGUF --outtype | file MB | perplexity in llama.cpp | max abs logit diff vs arwkv "
             "| greedy agreement |",
             "|---|---|---|---|---|"]
    for outtype, r in results["outtypes"].items():
        lines.append(f"| {outtype} | {r['file_mb']} | {r['ppl']:.6g} | {r['max_abs_logit_diff']:.2e} | "
                     f"{r['greedy_agreement']:.1%} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
