"""Evaluation of any AutoModel encoder: embeddings, GLUE-style tasks, STS, retrieval, the suite.

Heavy pieces (accelerate, sklearn, sentence-transformers) are imported inside the functions that use them.
The names below are imported on first use: importing them here would import glue / sts / retrieval (through
the suite) before `python -m textjepa.evaluation.glue` runs it, which runpy warns about.
"""

import importlib

_MODULE_OF = {
    "SentenceEncoder": "embedding", "encode": "embedding", "load_encoder": "embedding", "run_suite": "suite",
    "export_sentence_transformer": "sentence_transformers_export", "MtebEncoder": "mteb_adapter",
    **{name: "metrics" for name in ("accuracy", "f1", "matthews", "pearson", "spearman", "ndcg_at_k", "recall_at_k",
                                    "mrr_at_k", "classification_metrics", "regression_metrics", "retrieval_metrics")},
}

__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
