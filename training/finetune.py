"""python -m training.finetune DATA_DIR --out DIR: fine-tune the BERT on interaction pairs, contrastively.

Pairs are (item a user liked, the next item the same user liked) from the *history* part of the
evaluation's time split only, so no evaluated positive is ever trained on. The loss is in-batch
negatives (every other pair's item in the batch is a negative), the encoder is the exact function the
export serves (BERT + pooling + L2 normalization). The output is a sentence-transformers directory:
run it through `python -m export --model DIR` and its gate like any other fine-tuned BERT.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np

import logs
import settings
from client.catalog import load_movielens
from client.evaluate import time_split

log = logs.get("training")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def interaction_pairs(data_dir: Path, max_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    items, interactions, _ = load_movielens(data_dir)
    history, _ = time_split(interactions)
    text = {item.item_id: item.text for item in items}
    liked = history.take(history.rating >= 4.0)
    pairs = set()
    same_user = liked.user[1:] == liked.user[:-1]
    for a, b in zip(liked.item[:-1][same_user], liked.item[1:][same_user]):
        if a != b:
            pairs.add((int(a), int(b)))
    pairs = sorted(pairs)
    rng = np.random.default_rng(seed)
    rng.shuffle(pairs)
    return [(text[a], text[b]) for a, b in pairs[:max_pairs]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=settings.MOVIELENS_DIR)
    parser.add_argument("--model", type=Path, default=None, help="BERT directory (default: the default model)")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "finetuned")
    parser.add_argument("--pairs", type=int, default=24000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--scale", type=float, default=20.0, help="logit scale of the in-batch softmax")
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args(argv)
    logs.configure()

    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from export.onnx_export import load_torch_encoder
    from export.source import load_source

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    source = load_source(args.model or settings.default_model_dir())
    pairs = interaction_pairs(args.data, args.pairs)
    log.info("%d (liked, next liked) pairs from the training part of the split", len(pairs))
    tokenizer = AutoTokenizer.from_pretrained(source.transformer_path)
    encoder = load_torch_encoder(source, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * (len(pairs) // args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps + 1)))

    def encode(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        return encoder(batch["input_ids"], batch["attention_mask"])

    started, losses = time.perf_counter(), []
    progress = tqdm(total=steps, desc="fine-tuning", unit="step", disable=None)
    for epoch in range(args.epochs):
        order = np.random.default_rng(epoch).permutation(len(pairs))
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            chunk = [pairs[i] for i in order[start : start + args.batch_size]]
            anchors, positives = encode([a for a, _ in chunk]), encode([b for _, b in chunk])
            logits = args.scale * anchors @ positives.T
            labels = torch.arange(len(chunk))
            loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            progress.update(1)
            if len(losses) % 50 == 0:
                log.info("step %d/%d loss %.3f", len(losses), steps, np.mean(losses[-50:]))
    progress.close()

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    encoder.bert.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ST_FILES:
        if (source.path / name).exists():
            shutil.copyfile(source.path / name, out / name)
    if (source.path / "1_Pooling").exists():
        shutil.copytree(source.path / "1_Pooling", out / "1_Pooling")
    (out / "FINETUNED.txt").write_text(
        f"base: {source.path} ({source.sha256})\ndata: {args.data} (history part of the time split)\n"
        f"pairs: {len(pairs)}, epochs: {args.epochs}, batch: {args.batch_size}, lr: {args.lr}\n"
        f"loss: first 50 steps {np.mean(losses[:50]):.3f}, last 50 steps {np.mean(losses[-50:]):.3f}\n")
    log.info(f"{len(losses)} steps in {time.perf_counter() - started:.0f} s; loss "
             f"{np.mean(losses[:50]):.3f} -> {np.mean(losses[-50:]):.3f}; written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
