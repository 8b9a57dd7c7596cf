"""Rolling a new encoder version out to a live Triton: see rollout/steps.py (mechanism) and README.md."""
