"""Training that turns interaction data into a better encoder; its output goes through `python -m bert_recsys.export` and its gate."""
