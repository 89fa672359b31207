"""Serving arwkv students and hybrids in other engines.

- ``vllm_plugin``: the ``vllm.general_plugins`` entry point, which registers the student's
  architecture and configuration with vLLM (imports nothing of vLLM's until vLLM calls it);
- ``vllm_model``: the student as a vLLM model: time-mixing layers whose recurrent state lives in
  vLLM's state cache, kept attention layers as vLLM's own.

Nothing here is imported by the rest of arwkv: vLLM is an optional dependency (``.[vllm]``).
"""
