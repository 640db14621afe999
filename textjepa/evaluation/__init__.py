"""Evaluation of any AutoModel encoder: embeddings, GLUE-style tasks, STS, retrieval, the suite.

Heavy pieces (accelerate, sklearn, sentence-transformers) are imported inside the functions that use them.
"""

from textjepa.evaluation.embedding import SentenceEncoder, encode, load_encoder
from textjepa.evaluation.metrics import (accuracy, classification_metrics, f1, matthews, mrr_at_k, ndcg_at_k, pearson,
                                         recall_at_k, regression_metrics, retrieval_metrics, spearman)
from textjepa.evaluation.mteb_adapter import MtebEncoder
from textjepa.evaluation.sentence_transformers_export import export_sentence_transformer
from textjepa.evaluation.suite import run_suite

__all__ = ["SentenceEncoder", "encode", "load_encoder", "run_suite", "export_sentence_transformer", "MtebEncoder",
           "accuracy", "f1", "matthews", "pearson", "spearman", "ndcg_at_k", "recall_at_k", "mrr_at_k",
           "classification_metrics", "regression_metrics", "retrieval_metrics"]
