"""Collation throughput of SpanMaskCollator: ms per batch and tokens/s, I-JEPA-like and data2vec-like masks.

    python benchmarks/collation.py [--batch-size 32] [--length 128] [--packed /path/to/save_to_disk_dir]

Inputs are lists of Python ints, as a map-style `datasets` Dataset hands them to a DataLoader, so the
time includes list -> tensor conversion. With --packed, a last row times a real DataLoader (fetch from
the packed Arrow dataset + collate, num_workers=0) on the dataset's "train" split.
"""

import argparse
import time

import numpy as np

from textjepa.masking import MaskingConfig, SpanMaskCollator


def time_collator(collator, examples, min_seconds=1.0):
    collator(examples)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        collator(examples)
        n += 1
    return (time.perf_counter() - start) / n


def time_dataloader(path, collator, batch_size, num_batches=50):
    import datasets
    import torch

    packed = datasets.load_from_disk(path)
    if isinstance(packed, datasets.DatasetDict):
        packed = packed["train"]
    loader = torch.utils.data.DataLoader(packed, batch_size=batch_size, shuffle=True, collate_fn=collator)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return (time.perf_counter() - start) / num_batches, len(packed[0]["input_ids"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--packed", default=None, help="a save_to_disk dir of packed blocks (optional)")
    args = parser.parse_args()
    B, L = args.batch_size, args.length
    rng = np.random.default_rng(0)
    examples = [{"input_ids": rng.integers(5, 8192, L).tolist()} for _ in range(B)]

    rows = []
    for name, make in (("ijepa-like", MaskingConfig.ijepa_like), ("data2vec-like", MaskingConfig.data2vec_like)):
        for K in (1, 4):
            for extra in ({}, {"special_token_ids": [2], "extra_context_drop": 0.1}):
                config = make(num_masks=K, **extra)
                seconds = time_collator(SpanMaskCollator(config, seed=0), examples)
                nt, nd, nc, m = config.counts(L)
                label = name + (" +sep,+drop0.1" if extra else "")
                rows.append((label, K, nt, nc, m, seconds))
    if args.packed:
        seconds, L_packed = time_dataloader(args.packed, SpanMaskCollator(MaskingConfig(num_masks=4)), B)
        rows.append((f"DataLoader(packed L{L_packed})+ijepa", 4, 0, 0, 4, seconds))

    print(f"SpanMaskCollator, batch {B} x length {L} (numpy {np.__version__})")
    print(f"{'masks':<28} {'K':>2} {'Nt':>4} {'Nc':>4} {'spans':>5} {'ms/batch':>9} {'tokens/s':>12}")
    for label, K, nt, nc, m, seconds in rows:
        print(f"{label:<28} {K:>2} {nt:>4} {nc:>4} {m:>5} {seconds * 1e3:>9.2f} {B * L / seconds:>12,.0f}")


if __name__ == "__main__":
    main()
