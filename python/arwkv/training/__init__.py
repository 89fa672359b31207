"""``arwkv distill``: the training loop (``trainer``), what each of the four stages does
(``stages``), their losses (``losses``), run directories and exact resume (``checkpoint``), and
the metrics log, progress line and loss plot (``monitor``)."""
