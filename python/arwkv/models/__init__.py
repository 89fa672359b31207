"""The student model: an RWKV-7 / RWKV-6 time-mixing decoder (or a hybrid that keeps some of the
teacher's attention layers), in transformers' configuration_/modeling_ layout; a checkpoint
carries both files, so it loads with ``trust_remote_code`` where arwkv is not installed."""
