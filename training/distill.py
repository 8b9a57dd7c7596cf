"""bert-recsys train distill: a smaller student BERT, distilled from the teacher on unlabeled in-domain text, on CPU.

    bert-recsys train distill --layers 3                    # 3 of all-MiniLM-L6-v2's 6 layers -> build/students/
    bert-recsys export --model build/students/<name> --out build/export-student --variants onnx-fp32,onnx-int8

The student is the teacher with k of its layers kept, its embeddings and pooling unchanged. Which k layers: by
default (`--keep auto`) every combination is tried untrained, and the one whose embeddings are closest to the
teacher's (mean cosine on 300 training texts, before any training) is trained. For all-MiniLM-L6-v2 and k=3
that is 0, 4, 5 (held-out cosine 0.715 untrained), against 0.326 for the evenly spaced 0, 2, 4. `--keep even`
keeps evenly spaced layers from the first; `--keep 0,2,4` names them. The student is trained to reproduce the teacher's L2-normalized sentence embeddings
(loss 1 - cosine) on text of the kinds it will serve: STS-B train sentences, SciFact-train titles and abstracts,
MovieLens titles. STS-B dev, where the gate measures, is never trained on. The directory written is a
sentence-transformers model like the teacher, plus `distill.json`: its lineage (teacher path and sha256, layers
kept, data files with their sha256 and counts, epochs, losses). `bert-recsys export` reads that lineage, measures
the student against the teacher too (STS-B Spearman ratio to the teacher, both halves; threshold
`teacher_spearman_ratio`, default 0.985) and writes the lineage into every variant's manifest. The exported
student rolls out like any variant (`bert-recsys rollout run build/export-student/onnx-int8`).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.export.lineage import LINEAGE_FILE, SOURCES, WEIGHT_FILES, read_texts

log = logs.get("distill")
def kept_layers(total: int, keep: int) -> list[int]:
    """`keep` of `total` layers, evenly spaced from the first: 3 of 6 -> [0, 2, 4]; 2 of 6 -> [0, 3]."""
    if not 1 <= keep <= total:
        raise ValueError(f"a student keeps between 1 and {total} layers, not {keep}")
    return [round(i * total / keep) for i in range(keep)]


def choose_layers(scores: dict[tuple[int, ...], float]) -> list[int]:
    """The combination of kept layers whose untrained student came closest to the teacher (mean cosine on
    training texts, before any training); a tie goes to the combination listed first."""
    if not scores:
        raise ValueError("no combination of layers was scored")
    return list(max(scores, key=scores.get))  # max keeps the first of equals


def score_layer_choices(bert, pooling, tokenizer, texts: list[str], targets, keep: int, max_length: int):
    """-> {layers: mean cosine to the teacher} for every combination of `keep` of the teacher's layers, each
    student untrained (the teacher's own weights), on `texts` whose teacher embeddings are `targets`. 20
    combinations for 3 of 6 layers, ~5 s each for 300 texts on 2 cores."""
    from bert_recsys.export.onnx_export import SentenceEncoder

    scores = {}
    for layers in itertools.combinations(range(bert.config.num_hidden_layers), keep):
        student = SentenceEncoder(student_from(bert, list(layers)), pooling).eval()
        vectors = embed_all(student, tokenizer, texts, max_length, 128, "", progress=False)
        scores[layers] = float((vectors * targets).sum(dim=1).mean())
        log.info("layers %s untrained: mean cosine to the teacher %.4f", list(layers), scores[layers])
    return scores


def student_from(teacher, layers: list[int]):
    """A copy of the teacher BERT with only `layers` of its encoder, in that order."""
    import torch

    student = copy.deepcopy(teacher)
    student.encoder.layer = torch.nn.ModuleList([student.encoder.layer[i] for i in layers])
    student.config.num_hidden_layers = len(layers)
    return student


def encode(encoder, tokenizer, texts: list[str], max_length: int):
    """`encoder`: an export.onnx_export.SentenceEncoder (BERT + pooling + L2 normalization)."""
    import torch

    from bert_recsys.export.runners import tokenize

    ids, mask = tokenize(tokenizer, texts, max_length)
    return encoder(torch.from_numpy(ids), torch.from_numpy(mask))


def embed_all(encoder, tokenizer, texts: list[str], max_length: int, batch_size: int, label: str,
              progress: bool = True):
    """Normalized embeddings in input order, length-sorted batches, a log line every ~10%."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), encoder.bert.config.hidden_size)
    starts = list(range(0, len(texts), batch_size))
    with torch.inference_mode():
        for n, start in enumerate(starts):
            index = order[start:start + batch_size]
            out[index] = encode(encoder, tokenizer, [texts[i] for i in index], max_length).float()
            if progress and n % max(1, len(starts) // 10) == 0:
                log.info("%s: %d/%d texts", label, min(start + batch_size, len(texts)), len(texts))
    return out


def write_student(student, teacher_dir: Path, out: Path, lineage: dict) -> Path:
    """The teacher's sentence-transformers directory with the student's weights and config: built aside, then
    renamed into place."""
    from bert_recsys.export.source import load_source

    teacher = load_source(teacher_dir)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(teacher.path, staging, ignore=shutil.ignore_patterns(*WEIGHT_FILES, "onnx", "openvino", "*.onnx",
                                                                         "__pycache__", "*.py", LINEAGE_FILE))
    transformer_dir = staging / teacher.transformer_path.relative_to(teacher.path)
    student.save_pretrained(transformer_dir, safe_serialization=True)
    (staging / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def distill(args) -> Path:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from bert_recsys.export.onnx_export import SentenceEncoder
    from bert_recsys.export.source import load_source

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    teacher_source = load_source(args.teacher)
    if args.keep == "even":
        layers = kept_layers(teacher_source.num_layers, args.layers)
    elif args.keep != "auto":
        layers = [int(i) for i in args.keep.split(",")]
        if sorted(set(layers)) != layers or layers[-1] >= teacher_source.num_layers:
            raise ValueError(f"--keep {args.keep}: increasing layer indices below {teacher_source.num_layers}")
    elif not 1 <= args.layers <= teacher_source.num_layers:
        raise ValueError(f"a student keeps between 1 and {teacher_source.num_layers} layers, not {args.layers}")
    texts, provenance = read_texts(args.data, args.sources.split(","), args.max_texts, args.seed)
    held = max(1, len(texts) // 50)
    validation, training = texts[:held], texts[held:]
    log.info("teacher %s (%d layers, sha256 %s); %d training texts, %d held out", teacher_source.path,
             teacher_source.num_layers, teacher_source.sha256[:12], len(training), held)

    tokenizer = AutoTokenizer.from_pretrained(teacher_source.transformer_path)
    bert = AutoModel.from_pretrained(teacher_source.transformer_path, attn_implementation="sdpa")
    teacher = SentenceEncoder(bert, teacher_source.pooling).eval()
    started = time.perf_counter()
    targets = embed_all(teacher, tokenizer, training, args.max_length, 128, "teacher embeddings")
    held_targets = embed_all(teacher, tokenizer, validation, args.max_length, 128, "teacher, held out")
    choice = {"rule": args.keep if args.keep in ("auto", "even") else "given"}
    if args.keep == "auto":
        # Chosen on training texts (before any training), so the held-out figure stays clean; never on STS-B dev,
        # where the gate measures.
        probe = min(len(training), args.probe_texts)
        scores = score_layer_choices(bert, teacher_source.pooling, tokenizer, training[:probe], targets[:probe],
                                     args.layers, args.max_length)
        layers = choose_layers(scores)
        choice.update(texts=probe, mean_cosine={",".join(map(str, k)): round(v, 5) for k, v in scores.items()})
    log.info("the student keeps the teacher's layers %s (%s)", layers, choice["rule"])
    student = SentenceEncoder(student_from(bert, layers), teacher_source.pooling).train()
    del teacher, bert

    def held_cosine() -> float:
        student.eval()
        vectors = embed_all(student, tokenizer, validation, args.max_length, 128, "student, held out")
        student.train()
        return float((vectors * held_targets).sum(dim=1).mean())

    before = held_cosine()
    steps_per_epoch = math.ceil(len(training) / args.batch)  # the number of length-sorted batches below
    total = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))
    losses, step = [], 0
    rng = random.Random(args.seed)
    training_started = time.perf_counter()
    # Batches of texts of similar length (little padding: titles and abstracts differ 10x), in random order.
    by_length = sorted(range(len(training)), key=lambda i: len(training[i]))
    batches = [by_length[start:start + args.batch] for start in range(0, len(by_length), args.batch)]
    for epoch in range(args.epochs):
        rng.shuffle(batches)
        epoch_losses = []
        for index in batches:
            predicted = encode(student, tokenizer, [training[i] for i in index], args.max_length)
            loss = (1 - (predicted * targets[index]).sum(dim=1)).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            epoch_losses.append(loss.item())
            if step == 1 or step % args.log_every == 0 or step == total:
                spent = time.perf_counter() - training_started
                log.info("epoch %d step %d/%d loss %.5f (%.0f s in all, ~%.0f s of training left)", epoch + 1, step,
                         total, epoch_losses[-1], time.perf_counter() - started, spent / step * (total - step))
        losses.append({"epoch": epoch + 1, "first": epoch_losses[0], "mean": sum(epoch_losses) / len(epoch_losses),
                       "last": epoch_losses[-1]})
    student.eval()
    after = held_cosine()
    seconds = time.perf_counter() - started
    log.info("held-out mean cosine to the teacher: %.4f before training, %.4f after (%.0f s)", before, after, seconds)
    lineage = {
        "teacher": {"path": str(teacher_source.path), "sha256": teacher_source.sha256,
                    "layers": teacher_source.num_layers},
        "layers_kept": layers, "layer_choice": choice, "data": provenance,
        "texts": {"training": len(training), "held_out": held},
        "training": {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "max_length": args.max_length,
                     "steps": total, "seed": args.seed, "loss": "1 - cosine to the teacher's normalized embedding",
                     "losses": losses, "seconds": round(seconds, 1)},
        "held_out_cosine": {"before": before, "after": after},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = args.out or settings.BUILD_DIR / "students" / f"student-l{len(layers)}"
    return write_student(student.bert, teacher_source.path, Path(out), lineage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys train distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None, help="default: all-MiniLM-L6-v2")
    parser.add_argument("--layers", type=int, default=3, help="how many of the teacher's layers to keep")
    parser.add_argument("--keep", default="auto",
                        help="auto: the combination of --layers layers closest to the teacher untrained, on training "
                             "texts before training; even: evenly spaced from the first; or the layers, e.g. 0,2,4 "
                             "(overrides --layers)")
    parser.add_argument("--probe-texts", type=int, default=300,
                        help="training texts that score each combination (--keep auto)")
    parser.add_argument("--data", type=Path, default=settings.SHARED_DATA_DIR)
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--max-texts", type=int, default=30_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="default: build/students/student-l<k>")
    args = parser.parse_args(argv)
    logs.configure()
    args.teacher = args.teacher or settings.default_model_dir()
    try:
        out = distill(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
