"""Evaluation metrics computed by the project (numpy / scipy / scikit-learn; nothing downloaded).

Classification: accuracy, F1 (binary for 2 classes, macro otherwise), Matthews correlation.
Regression:     Pearson, Spearman (scipy; ties get average ranks).
Retrieval:      nDCG@k, Recall@k, MRR@k from ranked document ids and BEIR-style qrels
                (gain = graded relevance, discount = log2(rank + 1), as pytrec_eval / BEIR).
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


def retrieval_metrics(rankings, qrels, ndcg_ks=(10,), recall_ks=(1, 10, 100), mrr_ks=(10,)):
    """rankings: {query_id: [doc ids best first]}; qrels: {query_id: {doc_id: relevance}}.

    Averaged over the queries in qrels (BEIR convention); a query with no ranking scores 0.
    """
    if not qrels:
        raise ValueError("retrieval_metrics: qrels is empty")
    results = {}
    for name, fn, ks in (("ndcg", ndcg_at_k, ndcg_ks), ("recall", recall_at_k, recall_ks), ("mrr", mrr_at_k, mrr_ks)):
        for k in ks:
            per_query = [fn(rankings.get(qid, []), rel, k) for qid, rel in qrels.items()]
            results[f"{name}_at_{k}"] = float(np.mean(per_query))
    return results
