"""arwkv: turn a pretrained Transformer LLM into an RWKV-7 (or RWKV-6) RNN-attention model.

The kernels live in :mod:`arwkv_ext` (``torch.ops.arwkv.wkv7`` / ``wkv6``); this package is
the Python layer on top of them (model, conversion and distillation arrive in later releases).
"""

__version__ = "0.1.0"
