"""python -m bert_recsys: the same command line as the `bert-recsys` script."""
from bert_recsys.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
