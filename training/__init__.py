"""Training that turns interaction data into a better encoder; its output goes through `python -m export` and its gate."""
