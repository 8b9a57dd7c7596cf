"""Training that turns interaction data into a better encoder; its output goes through `bert-recsys export` and its gate."""
