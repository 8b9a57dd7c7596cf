"""The peers' benchmark (`make bench-peers`): harness.py here, worker.py inside each peer's own venv."""
