"""An untrained encoder whose token table holds co-occurrence vectors: the "distributional semantics
for free" control of the equal-compute comparison.

    python benchmarks/cooccurrence_encoder.py --encoder runs/compare30/random-init --packed PACKED \
        --output runs/cooc-init
    textjepa evaluate --model runs/cooc-init --model runs/compare30/random-init --data-dir ../shared/data \
        --split validation --whiten-on '../shared/data/pretrain/*.parquet' --token-weights sif

It copies `--encoder` (any directory AutoModel loads) and replaces its input embeddings with PPMI-SVD word
vectors (Levy & Goldberg: counts within +-window tokens weighted 1/distance, positive PMI with the context
distribution raised to 0.75, the top H singular vectors scaled by sqrt(singular value)), each row unit length
and the table rescaled to the original table's std. Nothing else changes: the transformer stays untrained.
Counting 10 M tokens and the SVD take about 20 s on one core at vocabulary 8192.

What a pretraining objective learns beyond this (and beyond the random table) is its own contribution; at 30
CPU-minutes the co-occurrence table already gives what textjepa gains on topic classification, and costs
zero-shot STS and retrieval their exact-token matching (docs/compare_small_30min_auto.md).
"""
import argparse
import shutil

import numpy as np
import torch


def cooccurrence_vectors(blocks, vocab_size, dims, window=5, context_power=0.75, seed=0):
    """blocks: (N, T) int token ids of packed text -> (vocab_size, dims) float32 PPMI-SVD vectors, unit rows
    (rows of tokens never seen are 0)."""
    from sklearn.utils.extmath import randomized_svd

    blocks = np.asarray(blocks, dtype=np.int64)
    counts = np.zeros(vocab_size * vocab_size)
    for distance in range(1, window + 1):  # symmetric counts of (token, token `distance` to its right)
        left, right = blocks[:, :-distance].ravel(), blocks[:, distance:].ravel()
        counts += np.bincount(left * vocab_size + right, minlength=vocab_size**2) / distance
        counts += np.bincount(right * vocab_size + left, minlength=vocab_size**2) / distance
    counts = counts.reshape(vocab_size, vocab_size)
    word_totals, context_totals = counts.sum(1), counts.sum(0) ** context_power
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts * context_totals.sum() / np.outer(word_totals, context_totals))
    ppmi = np.nan_to_num(np.maximum(pmi, 0.0), posinf=0.0).astype(np.float32)  # log 0 and 0/0 -> 0
    left_vectors, singular_values, _ = randomized_svd(ppmi, n_components=dims, random_state=seed)
    vectors = left_vectors * np.sqrt(singular_values)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="encoder directory to copy (its tokenizer must match --packed)")
    parser.add_argument("--packed", required=True, help="save_to_disk dataset (or DatasetDict's train) of input_ids blocks")
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-blocks", type=int, default=80_000, help="first N blocks counted (80,000 x 128 = 10 M tokens)")
    parser.add_argument("--window", type=int, default=5)
    args = parser.parse_args(argv)

    import textjepa  # noqa: F401  (registers the Auto classes)
    from datasets import DatasetDict, load_from_disk
    from transformers import AutoModel

    packed = load_from_disk(args.packed)
    if isinstance(packed, DatasetDict):
        packed = packed["train"]
    blocks = packed.select(range(min(args.max_blocks, len(packed))))["input_ids"]
    model = AutoModel.from_pretrained(args.encoder)
    table = model.get_input_embeddings().weight
    vectors = cooccurrence_vectors(blocks, table.shape[0], table.shape[1], window=args.window)
    vectors *= float(table.std()) / vectors.std()
    with torch.no_grad():
        table.copy_(torch.from_numpy(vectors))
    shutil.copytree(args.encoder, args.output, dirs_exist_ok=True)  # tokenizer and any shipped files
    model.save_pretrained(args.output)
    print(f"wrote {args.output}: {table.shape[0]} x {table.shape[1]} co-occurrence vectors from "
          f"{len(blocks) * len(blocks[0]):,} tokens")


if __name__ == "__main__":
    main()
