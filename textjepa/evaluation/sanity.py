"""A quick zero-shot check that an exported encoder learned something: continuation retrieval.

From `num_pairs` documents of the shipped quickstart corpus, the first 40 words of an 80-word
window are the query and the next 40 words its answer; every query is ranked against all answers by
cosine similarity of mean-pooled embeddings. The same figure for a randomly initialised encoder of
the same config (and, for context, a bag-of-words overlap score) shows what pretraining added.
In-domain text the model may have trained on: a sanity check, not a benchmark.
"""

from __future__ import annotations

import gzip

import numpy as np
import torch

from textjepa.corpus import QUICKSTART_GZ
from textjepa.evaluation.metrics import diagonal_top1_and_mrr


def continuation_pairs(num_pairs: int = 256, words: int = 40, seed: int = 0) -> tuple[list[str], list[str]]:
    with gzip.open(QUICKSTART_GZ, "rt", encoding="utf-8") as f:
        docs = [d.split() for d in f.read().split("\n\n")]
    docs = [d for d in docs if len(d) >= 2 * words]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(docs), size=min(num_pairs, len(docs)), replace=False)
    queries, answers = [], []
    for i in picked:
        doc = docs[i]
        start = int(rng.integers(0, len(doc) - 2 * words + 1))
        queries.append(" ".join(doc[start:start + words]))
        answers.append(" ".join(doc[start + words:start + 2 * words]))
    return queries, answers


def _embed(model, tokenizer, texts) -> torch.Tensor:
    """(N, H) L2-normalised mean-pooled embeddings, through the project's one encode()."""
    from textjepa.embedding.encoder import encode
    from textjepa.embedding.model_dir import default_max_length

    max_length = min(128, default_max_length(model.config, tokenizer))
    return encode(model, tokenizer, texts, max_length=max_length, show_progress=False, convert_to_tensor=True)


def continuation_retrieval(export_dir, num_pairs: int = 256) -> dict:
    import textjepa  # noqa: F401  (registers the textjepa model type with AutoModel)
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    trained = AutoModel.from_pretrained(str(export_dir))
    torch.manual_seed(12345)  # not the training seed: its init is where the teacher started
    random_init = AutoModel.from_config(AutoConfig.from_pretrained(str(export_dir)))
    queries, answers = continuation_pairs(num_pairs)
    results = {"pairs": len(queries)}
    for name, model in (("trained", trained), ("random_init", random_init)):
        similarity = _embed(model, tokenizer, queries) @ _embed(model, tokenizer, answers).T
        results[name] = dict(zip(("top1", "mrr"), diagonal_top1_and_mrr(similarity)))
    # bag-of-words cosine on the tokenizer's ids: the lexical floor
    vocab = len(tokenizer)

    def bow(texts):
        m = torch.zeros(len(texts), vocab)
        for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
            m[i].index_add_(0, torch.tensor(ids, dtype=torch.long), torch.ones(len(ids)))
        return torch.nn.functional.normalize(m, dim=-1)

    results["bag_of_words"] = dict(zip(("top1", "mrr"), diagonal_top1_and_mrr(bow(queries) @ bow(answers).T)))
    return results


def sanity_check(export_dir, num_pairs: int = 256) -> str:
    r = continuation_retrieval(export_dir, num_pairs)
    line = ", ".join(f"{name} MRR {r[name]['mrr']:.3f} (top-1 {r[name]['top1']:.3f})"
                     for name in ("trained", "random_init", "bag_of_words"))
    return (f"  zero-shot check, continuation retrieval on {r['pairs']} quickstart-corpus passages "
            f"(chance MRR ~{np.log(r['pairs']) / r['pairs']:.3f}): {line}")
