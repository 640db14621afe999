"""Zero-shot semantic textual similarity: cosine of pooled embeddings vs gold scores, Spearman x100.

    python -m textjepa.evaluation.sts --model DIR --task-dir ../shared/data/eval/stsb [--split test]
"""

import sys
import time

import numpy as np

from textjepa.evaluation.metrics import bootstrap_replicates, pearson, spearman
from textjepa.evaluation.tasks import labels_of, load_task_dir, texts_of


def cosine_scores(encoder, sentences1, sentences2, show_progress=False):
    """(N,) cosine similarity of each pair; every distinct sentence is encoded once."""
    from textjepa.embedding.encoder import encode_distinct

    u, v = encode_distinct(encoder, sentences1, sentences2, show_progress=show_progress, normalize=True)  # unit rows
    return (u * v).sum(axis=1)


def evaluate_sts(encoder, sentences1, sentences2, gold_scores, show_progress=False):
    if not (len(sentences1) == len(sentences2) == len(gold_scores)) or len(gold_scores) == 0:
        raise ValueError(f"evaluate_sts: need equal non-zero lengths, got {len(sentences1)}, {len(sentences2)}, "
                         f"{len(gold_scores)}")
    cosine = cosine_scores(encoder, sentences1, sentences2, show_progress)
    gold = np.asarray(gold_scores, dtype=np.float64)
    return {"spearman": 100.0 * spearman(gold, cosine), "pearson": 100.0 * pearson(gold, cosine)}


def evaluate_sts_task(encoder, spec, split="test", show_progress=False):
    """Zero-shot STS on one split of a loaded score task (num_labels == 1, sentence pairs)."""
    check_sts_task(spec, split)
    start = time.time()
    s1, s2 = texts_of(spec, split)
    return sts_result(spec, split, cosine_scores(encoder, s1, s2, show_progress), encoder.name, start)


def check_sts_task(spec, split):
    if not (spec.is_regression and spec.is_pair):
        raise ValueError(f"{spec.source}: zero-shot STS needs a sentence-pair score task (num_labels 1, two keys)")
    if split not in spec.splits:
        raise ValueError(f"{spec.name}: no {split} split for zero-shot STS")


def sts_result(spec, split, cosine, model_name, start):
    """The result dict for one split from (N,) similarity scores, any scorer (encoder or lexical baseline)."""
    gold = labels_of(spec, split)
    results = {"spearman": 100.0 * spearman(gold, cosine), "pearson": 100.0 * pearson(gold, cosine)}
    return {"task": spec.name, "mode": "zero_shot_sts", "model": model_name, "split": split, "metric": "spearman",
            split: results, "replicates": {split: bootstrap_replicates("spearman", gold, cosine)},
            "seconds": time.time() - start}


MODULE_PROG = "python -m textjepa.evaluation.sts"


def main(argv=None):
    from textjepa.embedding.encoder import SentenceEncoder
    from textjepa.evaluation.task_cli import encoder_main

    def add_arguments(p):
        p.add_argument("--task-dir", required=True)
        p.add_argument("--split", default="test")

    def evaluate(args):
        return evaluate_sts_task(SentenceEncoder(args.model, pooling=args.pooling), load_task_dir(args.task_dir),
                                 args.split, show_progress=True)

    return encoder_main(argv, "zero-shot STS (cosine Spearman x100)", add_arguments, evaluate,
                        lambda args, r: f"{r['task']} zero-shot {args.split}: spearman {r[args.split]['spearman']:.2f}",
                        prog=MODULE_PROG)


if __name__ == "__main__":
    from textjepa.cli import run

    raise SystemExit(run(MODULE_PROG, main, sys.argv[1:]))
