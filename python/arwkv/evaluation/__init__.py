"""Scoring checkpoints: perplexity, speed and cache memory (``perplexity``, ``arwkv eval``), and
loss by position with passkey retrieval (``long_context``, ``arwkv long-context``)."""
