"""Evaluation metrics computed by the project (numpy / scipy / scikit-learn; nothing downloaded).

Classification: accuracy, F1 (binary for 2 classes, macro otherwise), Matthews correlation.
Regression:     Pearson, Spearman (scipy; ties get average ranks).
Retrieval:      nDCG@k, Recall@k, MRR@k from ranked document ids and BEIR-style qrels, computed by
                pytrec_eval (as BEIR / MTEB); ndcg_at_k & co. are the same formulas in Python for one
                query (gain = graded relevance, discount = log2(rank + 1)), tested equal to pytrec_eval.
Intervals:      paired percentile bootstrap over test examples (bootstrap_replicates, interval).
All classification/regression figures are returned as fractions (0..1); callers scale x100 for tables.
"""

import math

import numpy as np
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

# GLUE's convention: which figures each task reports, the first one being the headline metric.
GLUE_TASK_METRICS = {
    "cola": ["matthews"],
    "sst2": ["accuracy"],
    "mrpc": ["f1", "accuracy"],
    "stsb": ["pearson", "spearman"],
    "qqp": ["accuracy", "f1"],
    "mnli": ["accuracy"],
    "qnli": ["accuracy"],
    "rte": ["accuracy"],
    "wnli": ["accuracy"],
}


def accuracy(labels, predictions):
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.size == 0:
        raise ValueError("accuracy: no examples")
    return float((labels == predictions).mean())


def f1(labels, predictions, num_labels=None):
    """Binary F1 of class 1 when there are 2 classes, macro F1 otherwise. No positive predictions -> 0.0."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if num_labels is None:
        num_labels = int(max(labels.max(initial=0), predictions.max(initial=0))) + 1
    if num_labels <= 2:
        return float(f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0.0))
    return float(f1_score(labels, predictions, average="macro", labels=list(range(num_labels)), zero_division=0.0))


def matthews(labels, predictions):
    return float(matthews_corrcoef(labels, predictions))


def pearson(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.std() == 0 or y.std() == 0:  # correlation undefined for a constant input: report 0, not NaN
        return 0.0
    return float(stats.pearsonr(x, y)[0])


def spearman(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(stats.spearmanr(x, y)[0])  # average ranks for ties


def classification_metrics(labels, predictions, num_labels):
    return {
        "accuracy": accuracy(labels, predictions),
        "f1": f1(labels, predictions, num_labels),
        "matthews": matthews(labels, predictions),
    }


def regression_metrics(labels, predictions):
    return {"pearson": pearson(labels, predictions), "spearman": spearman(labels, predictions)}


# ---------------------------------------------------------------- retrieval (one query at a time)
def ndcg_at_k(ranked_ids, relevance, k):
    """ranked_ids: doc ids best first; relevance: {doc_id: graded relevance}; docs with rel <= 0 are not relevant."""
    dcg = sum(relevance.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked_ids[:k]) if relevance.get(doc, 0) > 0)
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(rank + 2) for rank, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked_ids, relevance, k):
    relevant = {doc for doc, r in relevance.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked_ids[:k])) / len(relevant)


def mrr_at_k(ranked_ids, relevance, k):
    for rank, doc in enumerate(ranked_ids[:k]):
        if relevance.get(doc, 0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def diagonal_top1_and_mrr(similarity):
    """(top-1 accuracy, MRR over the full ranking) of a (Q, Q) torch similarity matrix whose right
    answer for query i is column i (ties counted in the query's favour)."""
    correct = similarity.diagonal().unsqueeze(1)
    ranks = (similarity > correct).sum(dim=1) + 1
    return float((ranks == 1).float().mean()), float((1.0 / ranks.float()).mean())


def retrieval_per_query(rankings, qrels, ndcg_ks=(10,), recall_ks=(1, 10, 100), mrr_ks=(10,)):
    """{metric: (Q,) per-query values in qrels order}, computed by pytrec_eval (trec_eval's C code).

    rankings: {query_id: [doc ids best first]}; qrels: {query_id: {doc_id: relevance}}. A query with no
    ranking scores 0 (BEIR convention; trec_eval itself would drop it).
    """
    import pytrec_eval

    if not qrels:
        raise ValueError("retrieval_metrics: qrels is empty")
    qrels = {str(q): {str(d): int(r) for d, r in rel.items()} for q, rel in qrels.items()}

    def run(cutoff):  # scores that keep the given order (trec_eval sorts by score)
        return {str(q): {str(d): float(len(ranked) - rank) for rank, d in enumerate(ranked[:cutoff])}
                for q, ranked in rankings.items() if str(q) in qrels and ranked}

    deepest = max((*ndcg_ks, *recall_ks))
    measures = {f"ndcg_cut.{','.join(map(str, ndcg_ks))}", f"recall.{','.join(map(str, recall_ks))}"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run(deepest))
    columns = {f"ndcg_at_{k}": f"ndcg_cut_{k}" for k in ndcg_ks} | {f"recall_at_{k}": f"recall_{k}" for k in recall_ks}
    results = {name: np.array([per_query.get(q, {}).get(key, 0.0) for q in qrels]) for name, key in columns.items()}
    for k in mrr_ks:  # MRR@k = reciprocal rank on the run cut at k
        reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run(k))
        results[f"mrr_at_{k}"] = np.array([reciprocal.get(q, {}).get("recip_rank", 0.0) for q in qrels])
    return results


def retrieval_metrics(rankings, qrels, ndcg_ks=(10,), recall_ks=(1, 10, 100), mrr_ks=(10,)):
    """{metric: mean over the queries in qrels} (fractions); see retrieval_per_query."""
    return {name: float(values.mean())
            for name, values in retrieval_per_query(rankings, qrels, ndcg_ks, recall_ks, mrr_ks).items()}


# ---------------------------------------------------------------- bootstrap intervals
BOOTSTRAP_RESAMPLES = 1000


def bootstrap_indices(n, resamples=BOOTSTRAP_RESAMPLES, seed=0):
    """(resamples, n) row indices. Fixed by (n, seed): two models scored on the same examples get the same
    resamples, so their replicates can be subtracted (a paired bootstrap)."""
    if n < 1:
        raise ValueError("bootstrap: no examples")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_replicates(metric, labels, predictions, resamples=BOOTSTRAP_RESAMPLES, seed=0):
    """(resamples,) values x100 of `metric` on resampled examples. metric: "mean" (labels are per-example
    scores, predictions ignored), "accuracy", "spearman", "pearson", or any name in classification_metrics."""
    labels = np.asarray(labels)
    index = bootstrap_indices(len(labels), resamples, seed)
    if metric == "mean":
        return 100.0 * np.asarray(labels, dtype=np.float64)[index].mean(axis=1)
    predictions = np.asarray(predictions)
    if metric == "accuracy":
        return 100.0 * (labels == predictions)[index].mean(axis=1)
    if metric in ("spearman", "pearson"):
        x, y = labels.astype(np.float64)[index], predictions.astype(np.float64)[index]  # (B, n)
        if metric == "spearman":
            x, y = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
        x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
        denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
        return 100.0 * np.divide((x * y).sum(axis=1), denominator, out=np.zeros(len(x)), where=denominator > 0)
    functions = {"f1": lambda a, b: f1(a, b, int(max(labels.max(), predictions.max())) + 1), "matthews": matthews}
    if metric not in functions:
        raise ValueError(f"bootstrap: unknown metric {metric!r}")
    return 100.0 * np.array([functions[metric](labels[rows], predictions[rows]) for rows in index])


def interval(replicates, level=0.95):
    """[low, high] percentile interval of bootstrap replicates."""
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(replicates, [tail, 100.0 - tail])
    return [float(low), float(high)]


def with_intervals(result):
    """A task result ready for JSON: its bootstrap replicates replaced by 95% intervals ("ci": {split: [lo, hi]})."""
    result = dict(result)
    replicates = result.pop("replicates", {})
    result["ci"] = {split: interval(values) for split, values in replicates.items()}
    return result
