"""arwkv: turn a pretrained Transformer LLM into an RWKV-7 (or RWKV-6) RNN-attention model.

The kernels live in :mod:`arwkv_ext` (``torch.ops.arwkv.wkv7`` / ``wkv6``); this package is the
Python layer on top of them, one folder per concern:

- ``models``: the student (transformers' configuration_/modeling_ layout);
- ``conversion``: teacher -> student (``convert``), student -> hybrid (``hybridize``);
- ``training``: ``arwkv distill``'s loop, stages, losses, checkpoints and metrics;
- ``evaluation``: perplexity, speed and cache memory; long-context curves and passkey retrieval;
- ``export``: GGUF for llama.cpp;
- ``data``: records, ``arwkv tokenize``'s token directories, rows cut from them lazily;
- ``loading`` (every checkpoint loader and its checks), ``options`` (every command's options: one
  dataclass each), ``runtime`` (shared small types: devices, dtypes, Place, ConfigError), ``files``
  (atomic writes), ``demo``, and ``cli`` (the ``arwkv`` command).
"""

__version__ = "0.1.0"
