"""The service gateway: an HTTP API in front of Triton (OpenAI-compatible embeddings, API keys, per-key rate
limits, metrics). It holds no model code: every vector comes from the `embed` ensemble through client.triton."""
