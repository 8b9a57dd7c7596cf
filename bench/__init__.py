"""The bench area: benchmarks and research tools, run from a checkout (`bert-recsys bench NAME`, `make bench-*`).
Not shipped: it imports bert_recsys like any user, and nothing of bert_recsys imports it."""
