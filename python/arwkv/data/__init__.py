"""Training data: records (records.py) -> token ids in a token directory (tokenize.py writes it,
shards.py reads it) -> rows of --seq-len tokens cut lazily from it (rows.py), visited in a seeded
order (order.py). Document boundaries travel as ``cu_seqlens``, so the recurrent state restarts
at every document. (Nothing is imported here: the tokenizing workers import only what they use.)"""
