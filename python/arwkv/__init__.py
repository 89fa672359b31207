"""arwkv: turn a pretrained Transformer LLM into an RWKV-7 (or RWKV-6) RNN-attention model.

The kernels live in :mod:`arwkv_ext` (``torch.ops.arwkv.wkv7`` / ``wkv6``); this package is the
Python layer on top of them: the student model (``modeling_rwkv_hybrid``), checkpoint conversion
(``convert``), the distillation stages and their training loop (``stages``, ``trainer``), data,
evaluation, the demo, and the ``arwkv`` command (``cli``).
"""

__version__ = "0.1.0"
