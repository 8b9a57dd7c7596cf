"""The typed contracts between the stages, each imported by both of its sides. Standard library only.

- `manifest`: what `export` writes beside every artifact and what the repository renderer and the rollout read;
- `runtime`: which runtime serves the encoder, as rendered into its config and read back from a live one;
- `digest`: `file_sha256`, the one file hash every stage pins and checks with;
- `protocol`: the client's wire protocols (`Protocol`);
- `machine`: the CPU model, ISA flags and cores a figure or a measured choice belongs to.

Names of models and tensors live in `settings` (`ModelNames`, `TensorNames`), the one source every stage
renders from; errors of the serving client in `client.errors`.
"""
