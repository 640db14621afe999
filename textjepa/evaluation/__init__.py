"""Evaluation of any AutoModel encoder: GLUE-style probes and fine-tuning, STS, retrieval, the suite (the
encoder that turns a model directory into vectors is textjepa.embedding's SentenceEncoder, re-exported here).

Heavy pieces (accelerate, sklearn, sentence-transformers) are imported inside the functions that use them.
The names below are imported on first use: importing them here would import sts / retrieval (through the
suite) before `python -m textjepa.evaluation.sts` runs it, which runpy warns about.
"""

import importlib

_MODULE_OF = {
    "SentenceEncoder": "textjepa.embedding.encoder", "encode": "textjepa.embedding.encoder",
    "load_encoder": "textjepa.embedding.encoder", "run_suite": "textjepa.evaluation.suite",
    "export_sentence_transformer": "textjepa.embedding.sentence_transformers_export",
    "MtebEncoder": "textjepa.evaluation.mteb_adapter",
    **{name: "textjepa.evaluation.metrics" for name in ("accuracy", "f1", "matthews", "pearson", "spearman",
                                                         "ndcg_at_k", "recall_at_k", "mrr_at_k", "classification_metrics",
                                                         "regression_metrics", "retrieval_metrics")},
}

__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
