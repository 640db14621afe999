"""Dense retrieval on the BEIR layout: corpus.jsonl, queries.jsonl, qrels/test.tsv (.gz accepted).

    python -m textjepa.evaluation.retrieval --model DIR --data_dir ../shared/data/retrieval/vitaminc_claims

Corpus entries are embedded as "title text"; queries and documents go through the same encoder.
Exact top-k by chunked matrix products: memory is (query_chunk x corpus_chunk) scores at a time plus
the running (query_chunk x k) best, however large the corpus. Metrics: nDCG@10, Recall@1/10/100, MRR@10.
"""

import argparse
import csv
import gzip
import json
import os
import time

import torch

from textjepa.evaluation.metrics import retrieval_metrics


def _open(path):
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate, (gzip.open(candidate, "rt", encoding="utf-8") if candidate.endswith(".gz")
                               else open(candidate, encoding="utf-8"))
    raise FileNotFoundError(f"{path}: not found (nor {path}.gz)")


def _read_jsonl(path, required):
    path, f = _open(path)
    rows = []
    with f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON: {error}") from error
            missing = [key for key in required if key not in row]
            if missing:
                raise ValueError(f"{path}:{line_number}: missing keys {missing}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty (no rows)")
    return rows


def load_beir(data_dir, split="test"):
    """-> (corpus {doc_id: text}, queries {query_id: text}, qrels {query_id: {doc_id: relevance}})."""
    corpus = {}
    for row in _read_jsonl(os.path.join(data_dir, "corpus.jsonl"), ("_id", "text")):
        title = (row.get("title") or "").strip()
        corpus[str(row["_id"])] = (title + " " + row["text"]).strip() if title else row["text"]
    queries = {str(row["_id"]): row["text"] for row in _read_jsonl(os.path.join(data_dir, "queries.jsonl"), ("_id", "text"))}
    qrels_path, f = _open(os.path.join(data_dir, "qrels", f"{split}.tsv"))
    qrels = {}
    with f:
        reader = csv.reader(f, delimiter="\t")
        for line_number, row in enumerate(reader, 1):
            if line_number == 1 and row and not row[-1].lstrip("-").isdigit():
                continue  # header: query-id corpus-id score
            if len(row) != 3:
                raise ValueError(f"{qrels_path}:{line_number}: expected 3 tab-separated fields, got {row}")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    if not qrels:
        raise ValueError(f"{qrels_path}: no judgements")
    unknown_queries = [q for q in qrels if q not in queries]
    unknown_docs = sorted({d for rel in qrels.values() for d in rel if d not in corpus})
    if unknown_queries:
        raise ValueError(f"{qrels_path}: {len(unknown_queries)} query ids not in queries.jsonl, e.g. {unknown_queries[:3]}")
    if unknown_docs:
        raise ValueError(f"{qrels_path}: {len(unknown_docs)} corpus ids not in corpus.jsonl, e.g. {unknown_docs[:3]}")
    return corpus, queries, qrels


def subsample(corpus, queries, qrels, max_queries):
    """Smoke runs: the first max_queries judged queries, their relevant docs plus as many other docs."""
    kept = dict(list(qrels.items())[:max_queries])
    doc_ids = {d for rel in kept.values() for d in rel}
    doc_ids.update(list(corpus)[:max_queries])
    return {d: corpus[d] for d in corpus if d in doc_ids}, {q: queries[q] for q in kept}, kept


def search(query_embeddings, corpus_embeddings, k, query_chunk=1024, corpus_chunk=50_000):
    """Exact top-k by dot product: (Q, H) x (N, H) -> scores (Q, k), indices (Q, k), best first."""
    query_embeddings = torch.as_tensor(query_embeddings, dtype=torch.float32)
    corpus_embeddings = torch.as_tensor(corpus_embeddings, dtype=torch.float32)
    k = min(k, corpus_embeddings.shape[0])
    all_scores, all_indices = [], []
    for q0 in range(0, query_embeddings.shape[0], query_chunk):
        queries = query_embeddings[q0:q0 + query_chunk]  # (q, H)
        best_scores = torch.full((queries.shape[0], 0), float("-inf"))
        best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.long)
        for c0 in range(0, corpus_embeddings.shape[0], corpus_chunk):
            scores = queries @ corpus_embeddings[c0:c0 + corpus_chunk].T  # (q, c)
            chunk_scores, chunk_indices = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, chunk_scores], dim=1)  # (q, <= 2k)
            merged_indices = torch.cat([best_indices, chunk_indices + c0], dim=1)
            best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_indices = merged_indices.gather(1, order)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def evaluate_retrieval(encoder, corpus, queries, qrels, k=100, show_progress=False, name=""):
    start = time.time()
    doc_ids, query_ids = list(corpus), list(qrels)  # only judged queries are scored (BEIR)
    corpus_embeddings = encoder.encode([corpus[d] for d in doc_ids], show_progress=show_progress, convert_to_tensor=True)
    query_embeddings = encoder.encode([queries[q] for q in query_ids], show_progress=show_progress, convert_to_tensor=True)
    _, top = search(query_embeddings, corpus_embeddings, k)
    rankings = {qid: [doc_ids[i] for i in row] for qid, row in zip(query_ids, top.tolist())}
    metrics = {key: 100.0 * value for key, value in retrieval_metrics(rankings, qrels).items()}
    return {"task": name, "mode": "retrieval", "model": encoder.name, "metric": "ndcg_at_10", "test": metrics,
            "num_queries": len(query_ids), "num_documents": len(doc_ids), "seconds": time.time() - start}


def main(argv=None):
    from textjepa.evaluation.embedding import SentenceEncoder

    p = argparse.ArgumentParser(description="dense retrieval on a BEIR folder")
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_queries", type=int, default=None)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    corpus, queries, qrels = load_beir(args.data_dir, args.split)
    if args.max_queries:
        corpus, queries, qrels = subsample(corpus, queries, qrels, args.max_queries)
    encoder = SentenceEncoder(args.model, pooling=args.pooling, batch_size=args.batch_size)
    results = evaluate_retrieval(encoder, corpus, queries, qrels, show_progress=True,
                                 name=os.path.basename(os.path.normpath(args.data_dir)))
    print(" ".join(f"{key} {value:.2f}" for key, value in results["test"].items()))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
