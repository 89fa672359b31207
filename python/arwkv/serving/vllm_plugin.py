"""vLLM plugin: lets ``vllm serve ./student`` and ``LLM(model="./student")`` run arwkv students.

vLLM calls :func:`register` in each of its processes (the entry point ``arwkv`` in the group
``vllm.general_plugins``, declared in pyproject.toml). It registers

- the architecture ``RwkvHybridForCausalLM`` (what ``arwkv convert`` writes in config.json's
  ``architectures``) as a lazy reference to :mod:`arwkv.serving.vllm_model`, so the model code is
  imported only by the processes that build the model;
- the configuration class of ``model_type`` ``rwkv_hybrid`` with transformers' AutoConfig, so the
  checkpoint's config loads without ``trust_remote_code``;
- a check of the configuration, run by vLLM when it reads it (before any model process starts),
  that refuses in one line what the model cannot serve.

Calling it again does nothing (vLLM loads plugins more than once per process).
"""

from __future__ import annotations

ARCHITECTURE = "RwkvHybridForCausalLM"
MODEL_CLASS = "arwkv.serving.vllm_model:RwkvHybridForCausalLM"
# The teacher families whose decoder layers vLLM builds for a hybrid's kept attention (the
# families arwkv convert is tested with); their MLP is the gated SiLU one.
SERVED_FAMILIES = ("qwen2", "qwen3", "llama", "mistral")


class ServeError(ValueError):
    """A student vLLM cannot serve as configured; the message names what and why."""


def check_servable(config, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                   speculative: bool = False, quantization: str | None = None) -> None:
    """Refuses, in one line, a student (an RwkvHybridConfig) this model cannot run: a teacher
    family whose layers it does not build, an MLP other than the gated SiLU one, heads that do not
    split over the tensor-parallel ranks, pipeline parallelism, speculative decoding,
    quantization (it would reach the MLPs and kept attention but not the time mixers)."""
    family = config.teacher_model_type
    if family not in SERVED_FAMILIES:
        raise ServeError(f"arwkv: vLLM serves students of {', '.join(SERVED_FAMILIES)} teachers, not "
                         f"{family!r}")
    mlp_bias = getattr(config, "mlp_bias", False)
    if config.hidden_act != "silu" or mlp_bias:
        raise ServeError(f"arwkv: vLLM serves the gated SiLU MLP without biases, not hidden_act "
                         f"{config.hidden_act!r} with mlp_bias {mlp_bias}")
    if config.num_wkv_heads % tensor_parallel:
        raise ServeError(f"arwkv: {config.num_wkv_heads} time-mixing heads do not split over "
                         f"--tensor-parallel-size {tensor_parallel}")
    if pipeline_parallel > 1:
        raise ServeError("arwkv: vLLM serves students without pipeline parallelism (use "
                         "--tensor-parallel-size)")
    if quantization is not None:
        raise ServeError(f"arwkv: vLLM serves students unquantized, not with quantization "
                         f"{quantization!r} (the time mixers are plain float layers)")
    if speculative:
        raise ServeError("arwkv: vLLM serves students without speculative decoding (a time mixer's "
                         "state cannot take back rejected draft tokens)")


def hold_block_size(cache_config, config) -> None:
    """A pure student (no attention layer) keeps vLLM's default block size as if the user had
    given it. Otherwise vLLM 0.32's CPU platform later changes the block size (16 -> 128) after the
    state-cache block size was derived from it (16), and the engine process, which re-derives its
    config, ends with the two disagreeing: the prefill is not split where states are kept, and no
    prefix-cache hit happens (measured: 0 of 290 shared tokens; 288 with the block size held)."""
    if not cache_config.user_specified_block_size and all(
            config.is_wkv_layer(i) for i in range(config.num_hidden_layers)):
        cache_config.user_specified_block_size = True


def register() -> None:
    """Registers the student's architecture with vLLM, its config with transformers, and the
    configuration check with vLLM."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    from ..models.configuration_rwkv_hybrid import RwkvHybridConfig

    class CheckStudent(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            config, parallel = vllm_config.model_config.hf_config, vllm_config.parallel_config
            check_servable(config, parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                           vllm_config.speculative_config is not None,
                           vllm_config.model_config.quantization)
            hold_block_size(vllm_config.cache_config, config)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, CheckStudent)
    AutoConfig.register(RwkvHybridConfig.model_type, RwkvHybridConfig, exist_ok=True)
