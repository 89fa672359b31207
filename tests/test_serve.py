"""Serving students and hybrids in vLLM (the plugin of arwkv.serving), against transformers.

These tests need vLLM's CPU build, which `make serve-test` installs into its own environment
(.venv-vllm) and runs them in; elsewhere they are skipped. Each vLLM engine start takes 20-40 s
here, so each test starts one and asks it everything it can.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (make serve-test installs vLLM's CPU build)")

from arwkv.conversion.convert import convert_checkpoint  # noqa: E402
from arwkv.models.modeling_rwkv_hybrid import RwkvHybridForCausalLM  # noqa: E402
from fixtures import tiny_teacher  # noqa: E402

DEMO_TEACHER = Path(__file__).resolve().parents[1] / "python" / "arwkv" / "demo_assets" / "teacher"
# Small engines: at most 3 sequences at once and a 64-token budget per step, so long prompts are
# prefilled in chunks and requests wait for running ones to finish.
ENGINE = dict(max_num_seqs=3, max_num_batched_tokens=64, max_model_len=512, enable_prefix_caching=True)
# Mixed lengths: one token (a new request that looks like a decode), the chunk edges, several
# chunks; more requests than slots.
LENGTHS = (1, 2, 7, 40, 63, 64, 65, 152, 11, 100)
NEW_TOKENS = 12

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the default takes a share of RAM
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict[str, Path]:
    """Students of the demo teacher (Qwen2, vocabulary 2048, 4 layers; q/k/v biases): pure and
    hybrid RWKV-7, an RWKV-6 one (qrwkv form) with group norm, no gate and the teacher's biases
    kept, and an RWKV-6 one of the finch form."""
    root = tmp_path_factory.mktemp("students")
    return {
        "pure": convert_checkpoint(DEMO_TEACHER, root / "pure"),
        "hybrid": convert_checkpoint(DEMO_TEACHER, root / "hybrid", wkv_layers=[1, 3]),
        "rwkv6": convert_checkpoint(DEMO_TEACHER, root / "rwkv6", wkv=6, group_norm=True, gate=False,
                                    keep_bias=True),
        "rwkv6-finch": convert_checkpoint(DEMO_TEACHER, root / "rwkv6-finch", wkv=6, wkv6_form="finch"),
    }


def prompts(lengths=LENGTHS, seed: int = 0, vocab: int = 2048) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


@contextlib.contextmanager
def engine(model: Path, dtype: str = "float32", **options):
    """A vLLM engine on ``model`` (the plugin registers the architecture: no trust_remote_code),
    shut down on exit so the next test can start its own."""
    from vllm import LLM

    llm = LLM(model=str(model), dtype=dtype, seed=0, **{**ENGINE, **options})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def vllm_greedy(llm, token_prompts: list[list[int]], new_tokens: int = NEW_TOKENS,
                logprobs: int | None = None):
    """All prompts submitted at once (vLLM schedules them); the outputs in prompt order."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, logprobs=logprobs)
    return llm.generate([{"prompt_token_ids": p} for p in token_prompts], params, use_tqdm=False)


def hf_greedy(model: Path, dtype: torch.dtype, token_prompts: list[list[int]], new_tokens: int = NEW_TOKENS):
    """transformers' greedy generate, one prompt at a time (stopping at EOS, as vLLM does):
    (tokens, log-probabilities [new, V])."""
    student = RwkvHybridForCausalLM.from_pretrained(model, dtype=dtype).eval()
    results = []
    for p in token_prompts:
        out = student.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
        scores = torch.log_softmax(torch.cat(out.scores).float(), dim=-1)
        results.append((out.sequences[0, len(p):].tolist(), scores))
    return results


def poison_states(model) -> int:
    """Fills every time-mixing layer's state cache (all slots) with large values: a request that
    read the slot it is given instead of starting from zeros would go wrong. Runs in the worker."""
    from arwkv.serving.vllm_model import TimeMixing

    layers = [m for m in model.modules() if isinstance(m, TimeMixing)]
    for layer in layers:
        for state in layer.kv_cache:
            state.fill_(7.0)
    return len(layers)


@pytest.mark.parametrize("kind", ["pure", "hybrid"])
def test_greedy_tokens_equal_transformers_fp32(students, kind):
    """Concurrent requests of mixed lengths (chunked prefill, more requests than sequences at once,
    a one-token prompt) over state caches filled with garbage (what a slot of a finished request
    holds) give transformers' tokens exactly; so do prompts that share a long prefix with an
    earlier one, which start from its saved state (prefix-cache hits)."""
    model = students[kind]
    batch = prompts()
    base = prompts((300,), seed=1)[0]
    shared = [base, base[:290] + [7, 8, 9], base]
    with engine(model) as llm:
        assert llm.apply_model(poison_states) == [4 if kind == "pure" else 2]
        outputs = vllm_greedy(llm, batch)
        cached = [vllm_greedy(llm, [p])[0] for p in shared]  # one after the other: later ones hit
    expected = hf_greedy(model, torch.float32, batch + shared)
    got = [list(o.outputs[0].token_ids) for o in outputs + cached]
    assert got == [tokens for tokens, _ in expected]
    hits = [o.num_cached_tokens for o in cached]
    assert hits[0] == 0 and hits[1] >= 256 and hits[2] >= 256, hits


def first_divergence_is_a_near_tie(vllm_output, hf_tokens: list[int], hf_logprobs: torch.Tensor,
                                   top: int = 5) -> bool:
    """vLLM's own criterion for 16-bit runs (its check_logprobs_close): the tokens agree up to a
    first difference, where each side's pick is among the other's ``top`` most likely tokens."""
    tokens = list(vllm_output.token_ids)
    for step, (mine, theirs) in enumerate(zip(tokens, hf_tokens, strict=True)):
        if mine != theirs:
            hf_top = hf_logprobs[step].topk(top).indices.tolist()
            return mine in hf_top and theirs in vllm_output.logprobs[step]
    return True


@pytest.mark.parametrize("kind", ["pure", "hybrid"])
def test_bfloat16_greedy_follows_transformers(students, kind, capsys):
    """bfloat16: vLLM's norms, MLPs and attention round differently from transformers', so on
    these untrained students (near-flat distributions: the top two tokens often within 0.01 nats)
    a greedy path may fork at a near tie. Each run must equal transformers' until it forks, and
    fork only where each side's pick is in the other's top 5 (vLLM's own criterion for 16-bit
    runs); a wrong state or mixer forks at once to tokens far down the other's list."""
    model = students[kind]
    batch = prompts()
    with engine(model, dtype="bfloat16") as llm:
        outputs = vllm_greedy(llm, batch, logprobs=5)
    expected = hf_greedy(model, torch.bfloat16, batch)
    same = 0
    for output, (tokens, logprobs) in zip(outputs, expected, strict=True):
        assert first_divergence_is_a_near_tie(output.outputs[0], tokens, logprobs), (output, tokens)
        same += list(output.outputs[0].token_ids) == tokens
    with capsys.disabled():
        print(f"\n{kind} bfloat16: {same} of {len(batch)} greedy runs equal transformers' to the end")


@pytest.fixture(scope="module")
def family_students(tmp_path_factory) -> dict[str, Path]:
    """Students of other teacher families (no tokenizer: token ids in, token ids out)."""
    root = tmp_path_factory.mktemp("families")
    made = {}
    for family, options in (("llama", dict(wkv_layers=[0, 2], head_size=32)),
                            ("qwen3", dict(wkv_layers=[1], head_size=128)),
                            ("mistral", dict(gate=False, head_size=16))):
        teacher = root / f"{family}-teacher"
        tiny_teacher(family, vocab=300, seed=3).save_pretrained(teacher)
        made[family] = convert_checkpoint(teacher, root / family, **options)
    return made


@pytest.mark.parametrize("case", ["rwkv6", "rwkv6-finch", "llama", "qwen3", "mistral"])
def test_other_students_equal_transformers(students, family_students, case):
    """RWKV-6 (qrwkv) with group norm, no gate and kept biases; RWKV-6 finch; hybrids of Llama
    (head size 32) and Qwen3 (head_dim 64 != hidden / heads; head size 128) teachers; a pure
    Mistral student without gate, head size 16."""
    model = students.get(case) or family_students[case]
    demo = case.startswith("rwkv6")  # students of the demo teacher
    batch = prompts((1, 9, 70, 130, 33), seed=2, vocab=2048 if demo else 300)
    options = {} if demo else dict(skip_tokenizer_init=True)
    with engine(model, **options) as llm:
        outputs = vllm_greedy(llm, batch)
    expected = hf_greedy(model, torch.float32, batch)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [tokens for tokens, _ in expected]


@pytest.mark.parametrize("wkv", [7, 6])
def test_tensor_parallel_over_two_ranks_equals_transformers(tmp_path, monkeypatch, wkv):
    """Two CPU ranks, one core each: the time mixers split by heads (6 heads of 32, three a rank;
    RWKV-6 with group norm over each rank's heads), the kept attention split as vLLM splits it."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one rank a core (one NUMA node here)
    options = dict(wkv_layers=[1, 3]) if wkv == 7 else dict(wkv=6, group_norm=True)
    model = convert_checkpoint(DEMO_TEACHER, tmp_path / "student", head_size=32, **options)
    batch = prompts((1, 9, 70, 130), seed=5)
    with engine(model, tensor_parallel_size=2) as llm:
        outputs = vllm_greedy(llm, batch)
    expected = hf_greedy(model, torch.float32, batch)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [tokens for tokens, _ in expected]


def test_the_check_names_what_it_refuses(students):
    from arwkv.models.configuration_rwkv_hybrid import RwkvHybridConfig
    from arwkv.serving.vllm_plugin import ServeError, check_servable

    config = RwkvHybridConfig.from_pretrained(students["hybrid"])
    check_servable(config, tensor_parallel=3)  # 3 heads of 64
    for options, message in ((dict(pipeline_parallel=2), "without pipeline parallelism"),
                             (dict(speculative=True), "without speculative decoding"),
                             (dict(quantization="fp8"), "unquantized, not with quantization 'fp8'"),
                             (dict(tensor_parallel=2), "3 time-mixing heads do not split")):
        with pytest.raises(ServeError, match=message):
            check_servable(config, **options)
    config.teacher_model_type = "gemma"
    with pytest.raises(ServeError, match="not 'gemma'"):
        check_servable(config)


def test_what_cannot_be_served_is_refused_in_one_line(tmp_path):
    """The plugin's check runs when vLLM reads the config, before any model process starts."""
    from vllm import LLM

    from arwkv.serving.vllm_plugin import ServeError

    teacher = tmp_path / "teacher"
    tiny_teacher("llama", vocab=300, hidden_act="gelu").save_pretrained(teacher)
    student = convert_checkpoint(teacher, tmp_path / "student")
    assert issubclass(ServeError, ValueError)  # vLLM reports it among its config's ValueErrors
    with pytest.raises(ValueError, match=r"arwkv: vLLM serves the gated SiLU MLP without biases, not "
                                         r"hidden_act 'gelu' with mlp_bias False\s"):
        LLM(model=str(student), skip_tokenizer_init=True, **ENGINE)
    teacher = tmp_path / "teacher-2"
    tiny_teacher("llama", vocab=300).save_pretrained(teacher)
    student = convert_checkpoint(teacher, tmp_path / "student-2", head_size=64)  # 2 heads
    with pytest.raises(ValueError, match=r"arwkv: 2 time-mixing heads do not split over "
                                         r"--tensor-parallel-size 4\s"):
        LLM(model=str(student), skip_tokenizer_init=True, tensor_parallel_size=4, **ENGINE)


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible server and a real client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: str, chars: int = 3000) -> str:
    return Path(path).read_text()[-chars:]


@contextlib.contextmanager
def server(model: Path, *args: str, timeout: float = 300):
    """``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; vllm-cpu's
    console script cannot start) on a free localhost port; yields its base URL."""
    import urllib.request

    port = free_port()
    log = open(model.parent / f"server-{port}.log", "w")  # noqa: SIM115  (closed below)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256", "--max-num-seqs", "4",
               "--max-num-batched-tokens", "64", *args]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vLLM server exited: {tail(log.name)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM server not up in {timeout} s: {tail(log.name)}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_openai_client_against_vllm_server(students):
    """Completions and chat, streaming and not, from the openai package against the hybrid served
    by vLLM: the completion's tokens are transformers' greedy ones; a prompt longer than the
    context gets vLLM's error and the server goes on serving."""
    import openai
    from transformers import AutoTokenizer

    model = students["hybrid"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    text = "The cat sat on the mat and looked at the"
    with server(model) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        served = client.models.list().data[0].id
        done = client.completions.create(model=served, prompt=text, max_tokens=10, temperature=0)
        pieces = client.completions.create(model=served, prompt=text, max_tokens=10, temperature=0,
                                           stream=True)
        streamed = "".join(chunk.choices[0].text for chunk in pieces)
        messages = [{"role": "user", "content": "Where is the cat?"}]
        chat = client.chat.completions.create(model=served, temperature=0, max_tokens=8, messages=messages)
        chat_pieces = client.chat.completions.create(model=served, temperature=0, max_tokens=8, stream=True,
                                                     messages=messages)
        chat_streamed = "".join(c.choices[0].delta.content or "" for c in chat_pieces if c.choices)
        with pytest.raises(openai.BadRequestError, match="maximum context length|max_model_len|too long"):
            client.completions.create(model=served, prompt="cat " * 400, max_tokens=4)
        after = client.completions.create(model=served, prompt=text, max_tokens=10, temperature=0)
    ids = tokenizer(text)["input_ids"]
    (tokens, _), = hf_greedy(model, torch.float32, [ids], new_tokens=10)
    assert done.choices[0].text == tokenizer.decode(tokens)
    assert streamed == done.choices[0].text == after.choices[0].text
    assert chat.choices[0].message.content == chat_streamed
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 10
