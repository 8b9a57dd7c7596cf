"""bert_recsys: BERT semantic recall and recommendations served by NVIDIA Triton.

One import name for the whole stack. The rooms keep their folders at the top of the checkout (client/, export/,
model_repository/, server/, rollout/, gateway/, training/, contracts/, encoders/) and are mapped to subpackages
by pyproject.toml's package-dir: `bert_recsys.client` is client/. The benchmarks (bench/), Locust (loadtest/) and
the tests are not shipped.
"""
__version__ = "0.5.0"
