"""Dense retrieval on the BEIR layout: corpus.jsonl, queries.jsonl, qrels/test.tsv (.gz accepted).

    python -m textjepa.evaluation.retrieval --model DIR --data-dir ../shared/data/retrieval/vitaminc_claims

Corpus entries are embedded as "title text"; queries and documents go through the same encoder.
Exact top-k by chunked matrix products: memory is (query_chunk x corpus_chunk) scores at a time plus
the running (query_chunk x k) best, however large the corpus. Metrics: nDCG@10, Recall@1/10/100, MRR@10
(pytrec_eval). The whole corpus is always searched; `subsample_corpus` exists only for an explicit
--subsample-corpus in the suite. Validation: see validation_test_qrels (a fixed half of the test queries
when the set has no validation judgements).
"""

import csv
import gzip
import json
import os
import sys
import time

import numpy as np
import torch

from textjepa.evaluation.metrics import bootstrap_replicates, retrieval_per_query


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


def _unique_ids(path):
    """Rows of a corpus/queries file; a repeated _id is an error (a dict would keep only the last one)."""
    rows, seen = _read_jsonl(path, ("_id", "text")), {}
    for line_number, row in enumerate(rows, 1):
        key = str(row["_id"])
        if key in seen:
            raise ValueError(f"{_open(path)[0]}: duplicate _id {key!r} (rows {seen[key]} and {line_number}); "
                             "expected one row per id")
        seen[key] = line_number
    return rows


def load_beir(data_dir, split="test"):
    """-> (corpus {doc_id: text}, queries {query_id: text}, qrels {query_id: {doc_id: relevance}})."""
    corpus = {}
    for row in _unique_ids(os.path.join(data_dir, "corpus.jsonl")):
        title = (row.get("title") or "").strip()
        corpus[str(row["_id"])] = (title + " " + row["text"]).strip() if title else row["text"]
    queries = {str(row["_id"]): row["text"] for row in _unique_ids(os.path.join(data_dir, "queries.jsonl"))}
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


def validation_test_qrels(data_dir, qrels, seed=0):
    """{"validation": qrels, "test": qrels}. BEIR sets mostly ship test judgements only: unless
    qrels/validation.tsv or qrels/dev.tsv exists, the judged test queries are split in two fixed
    halves (sorted ids, permuted with `seed`): the first half is validation, the rest test. Both
    halves search the full corpus; no query is in both."""
    for name in ("validation", "dev"):
        if any(os.path.isfile(os.path.join(data_dir, "qrels", f"{name}.tsv{gz}")) for gz in ("", ".gz")):
            return {"validation": load_beir(data_dir, name)[2], "test": qrels}
    ids = sorted(qrels)
    order = np.random.default_rng(seed).permutation(len(ids))
    half = len(ids) // 2
    return {"validation": {ids[i]: qrels[ids[i]] for i in sorted(order[:half])},
            "test": {ids[i]: qrels[ids[i]] for i in sorted(order[half:])}}


def subsample_corpus(corpus, qrels_by_split, size, seed=0):
    """Every judged document plus a seeded sample of the others, `size` documents in all (never fewer
    than the judged ones). Only with an explicit --subsample-corpus: small corpora inflate every score."""
    judged = {d for qrels in qrels_by_split.values() for rel in qrels.values() for d in rel}
    others = [d for d in corpus if d not in judged]
    rng = np.random.default_rng(seed)
    picked = set(rng.choice(len(others), size=max(0, min(len(others), size - len(judged))), replace=False).tolist())
    keep = judged | {others[i] for i in picked}
    return {d: text for d, text in corpus.items() if d in keep}


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


def evaluate_retrieval(encoder, corpus, queries, qrels_by_split, k=100, show_progress=False, name=""):
    """Dense retrieval over the whole `corpus` for each {split: qrels}; one result with every split."""
    start = time.time()
    doc_ids = list(corpus)
    query_ids = list(dict.fromkeys(q for qrels in qrels_by_split.values() for q in qrels))  # judged queries only
    corpus_embeddings = encoder.encode([corpus[d] for d in doc_ids], show_progress=show_progress, convert_to_tensor=True)
    query_embeddings = encoder.encode([queries[q] for q in query_ids], show_progress=show_progress, convert_to_tensor=True)
    _, top = search(query_embeddings, corpus_embeddings, k)
    rankings = {qid: [doc_ids[i] for i in row] for qid, row in zip(query_ids, top.tolist())}
    return retrieval_result(rankings, qrels_by_split, len(doc_ids), encoder.name, name, start)


def retrieval_result(rankings, qrels_by_split, num_documents, model_name, name, start):
    """The result dict from {query_id: ranked doc ids}, any ranker (encoder or BM25): metrics x100 per
    split and bootstrap replicates of nDCG@10 over queries."""
    result = {"task": name, "mode": "retrieval", "model": model_name, "metric": "ndcg_at_10", "replicates": {},
              "num_queries": {}, "num_documents": num_documents}
    for split, qrels in qrels_by_split.items():
        per_query = retrieval_per_query(rankings, qrels)
        result[split] = {key: 100.0 * float(values.mean()) for key, values in per_query.items()}
        result["replicates"][split] = bootstrap_replicates("mean", per_query["ndcg_at_10"], None)
        result["num_queries"][split] = len(qrels)
    result["seconds"] = time.time() - start
    return result


MODULE_PROG = "python -m textjepa.evaluation.retrieval"


def main(argv=None):
    from textjepa.embedding.encoder import SentenceEncoder
    from textjepa.evaluation.task_cli import encoder_main

    def add_arguments(p):
        p.add_argument("--data-dir", required=True)
        p.add_argument("--split", default="test")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--max-queries", type=int, default=None, help="score only the first N judged queries (full corpus)")

    def evaluate(args):
        corpus, queries, qrels = load_beir(args.data_dir, args.split)
        if args.max_queries:
            qrels = dict(list(qrels.items())[:args.max_queries])
        encoder = SentenceEncoder(args.model, pooling=args.pooling, batch_size=args.batch_size)
        return evaluate_retrieval(encoder, corpus, queries, {args.split: qrels}, show_progress=True,
                                  name=os.path.basename(os.path.normpath(args.data_dir)))

    return encoder_main(argv, "dense retrieval on a BEIR folder", add_arguments, evaluate,
                        lambda args, r: " ".join(f"{key} {value:.2f}" for key, value in r[args.split].items()),
                        prog=MODULE_PROG)


if __name__ == "__main__":
    from textjepa.cli import run

    raise SystemExit(run(MODULE_PROG, main, sys.argv[1:]))
