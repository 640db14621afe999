"""Lexical baselines, scored exactly like an encoder column (same splits, probe, metrics, intervals).

TF-IDF:  scikit-learn TfidfVectorizer(word uni+bigrams, sublinear tf, min_df 2), fitted on the train
         split's texts (both sentences of a pair), L2-normalised rows. Probe tasks: the same
         logistic-regression / ridge probe as the encoders (glue.fit_probe), pairs as [u, v, |u-v|, u*v].
         Zero-shot STS: cosine of the two sentences' vectors. Retrieval: cosine, fitted on the corpus
         with min_df 1.
BM25:    bm25s (Lucene's BM25 variant, k1 0.9, b 0.4 as Anserini/Pyserini) over the whole corpus;
         tokenisation: lower-case, scikit-learn's word pattern (?u)\\b\\w\\w+\\b, bm25s' English stop
         words, no stemming. Retrieval only.
Hybrid:  BM25 + an encoder (hybrid_retrieval): each ranker's scores over the whole corpus, min-max
         normalised per query, mixed as (1 - w) * BM25 + w * dense, w chosen on the validation queries.
"""

import time

import numpy as np

from textjepa.evaluation.probe import fit_probe
from textjepa.evaluation.retrieval import retrieval_result
from textjepa.evaluation.sts import check_sts_task, sts_result
from textjepa.evaluation.tasks import texts_of

BASELINES = ("tfidf", "bm25")
COLUMN_NAMES = {"tfidf": "TF-IDF", "bm25": "BM25"}
TFIDF_SETTINGS = dict(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
BM25_SETTINGS = dict(method="lucene", k1=0.9, b=0.4)
BM25_TOKENS = dict(lower=True, token_pattern=r"(?u)\b\w\w+\b", stopwords="english")


def _tfidf(texts, **overrides):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(**(TFIDF_SETTINGS | overrides)).fit(texts)


def _train_vectorizer(spec):
    s1, s2 = texts_of(spec, "train")
    return _tfidf(s1 + (s2 or []))


def tfidf_probe(spec):
    """The encoders' probe on TF-IDF features fitted on the train split."""
    import scipy.sparse

    start = time.time()
    vectorizer = _train_vectorizer(spec)
    features = {}
    for split in spec.splits:
        s1, s2 = texts_of(spec, split)
        u = vectorizer.transform(s1)
        if s2 is None:
            features[split] = u
        else:
            v = vectorizer.transform(s2)
            features[split] = scipy.sparse.hstack([u, v, abs(u - v), u.multiply(v)]).tocsr()
    results = fit_probe(features, spec, COLUMN_NAMES["tfidf"])
    results["seconds"] = time.time() - start
    return results


def tfidf_sts(spec, split):
    """Zero-shot STS: cosine of TF-IDF vectors (IDF from the train split's sentences)."""
    check_sts_task(spec, split)
    start = time.time()
    vectorizer = _train_vectorizer(spec)
    s1, s2 = texts_of(spec, split)
    cosine = np.asarray(vectorizer.transform(s1).multiply(vectorizer.transform(s2)).sum(axis=1)).ravel()
    return sts_result(spec, split, cosine, COLUMN_NAMES["tfidf"], start)


def tfidf_retrieval(corpus, queries, qrels_by_split, k=100, name="", query_chunk=256):
    """Cosine of TF-IDF vectors (fitted on the corpus, min_df 1: a word of one document is the strongest
    evidence a query can give) over the whole corpus."""
    start = time.time()
    doc_ids = list(corpus)
    query_ids = list(dict.fromkeys(q for qrels in qrels_by_split.values() for q in qrels))
    vectorizer = _tfidf([corpus[d] for d in doc_ids], min_df=1)
    documents = vectorizer.transform([corpus[d] for d in doc_ids]).T.tocsr()  # (V, N)
    query_vectors = vectorizer.transform([queries[q] for q in query_ids])
    rankings = _rank(query_ids, doc_ids, lambda rows: (query_vectors[rows] @ documents).toarray(), k, query_chunk)
    return retrieval_result(rankings, qrels_by_split, len(doc_ids), COLUMN_NAMES["tfidf"], name, start)


def _rank(query_ids, doc_ids, scores_of, k, query_chunk):
    """{query id: its top-k doc ids} from scores_of(slice of query rows) -> (q, N) scores, a chunk of
    queries at a time. Every lexical ranker goes through _top_k here (or in hybrid_retrieval), so tied
    documents come in one order everywhere: the lower corpus index first."""
    rankings = {}
    for q0 in range(0, len(query_ids), query_chunk):
        top = _top_k(scores_of(slice(q0, q0 + query_chunk)), k)
        rankings.update({query_ids[q0 + r]: [doc_ids[i] for i in row] for r, row in enumerate(top.tolist())})
    return rankings


def _top_k(scores, k):
    """(q, N) scores -> (q, k) column indices, best first (ties by lower index)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _bm25(doc_texts):
    """(bm25s index of the texts, the tokenizer to use for queries); settings in the module docstring."""
    try:
        import bm25s
    except ImportError as error:
        raise ImportError("--baseline bm25 needs the bm25s package: pip install bm25s") from error

    def tokenize(texts):
        return bm25s.tokenize(texts, show_progress=False, return_ids=False, **BM25_TOKENS)

    retriever = bm25s.BM25(**BM25_SETTINGS)
    retriever.index(tokenize(doc_texts), show_progress=False)
    return retriever, tokenize


def bm25_retrieval(corpus, queries, qrels_by_split, k=100, name="", query_chunk=256):
    """BM25 (bm25s) over the whole corpus; settings and tokenisation in the module docstring."""
    start = time.time()
    doc_ids = list(corpus)
    query_ids = list(dict.fromkeys(q for qrels in qrels_by_split.values() for q in qrels))
    retriever, tokenize = _bm25([corpus[d] for d in doc_ids])
    query_tokens = tokenize([queries[q] for q in query_ids])
    # every score, then _rank's tie order, as hybrid_retrieval at w = 0 (bm25s.retrieve puts the higher index
    # first among tied documents, which moved nDCG@10 on vitaminc_claims: docs/history.md)
    rankings = _rank(query_ids, doc_ids, lambda rows: _bm25_scores(retriever, query_tokens[rows]), k, query_chunk)
    return retrieval_result(rankings, qrels_by_split, len(doc_ids), COLUMN_NAMES["bm25"], name, start)


def _bm25_scores(retriever, query_tokens):
    """(q, N) BM25 score of every document for each tokenized query."""
    return np.stack([retriever.get_scores(tokens) for tokens in query_tokens])


HYBRID_WEIGHTS = tuple(i / 10 for i in range(11))  # the dense share w: 0 is BM25 alone, 1 the encoder alone


def _min_max(scores):
    """(q, N) -> each row mapped onto [0, 1] (a constant row -> zeros)."""
    low, high = scores.min(axis=1, keepdims=True), scores.max(axis=1, keepdims=True)
    return (scores - low) / np.where(high > low, high - low, 1.0)


def hybrid_retrieval(encoder, corpus, queries, qrels_by_split, weights=HYBRID_WEIGHTS, k=100, name="",
                     query_chunk=256):
    """BM25 + `encoder` over the whole corpus: per query both rankers score every document, each score
    vector is min-max normalised to [0, 1] and the two are mixed as (1 - w) * BM25 + w * dense (the
    convex combination that Bruch et al., "An Analysis of Fusion Functions for Hybrid Retrieval", find
    at least as good as reciprocal-rank fusion). w is chosen on the "validation" queries (best nDCG@10,
    ties to the smaller w); the result holds that w's metrics on every split, "weight", and the
    validation nDCG@10 of every w ("validation_ndcg_by_weight")."""
    if "validation" not in qrels_by_split:
        raise ValueError("hybrid_retrieval: the BM25 / dense weight is chosen on validation queries; "
                         f"qrels_by_split has only {sorted(qrels_by_split)}")
    start = time.time()
    doc_ids = list(corpus)
    query_ids = list(dict.fromkeys(q for qrels in qrels_by_split.values() for q in qrels))
    retriever, tokenize = _bm25([corpus[d] for d in doc_ids])
    query_tokens = tokenize([queries[q] for q in query_ids])
    corpus_embeddings = encoder.encode([corpus[d] for d in doc_ids])  # (N, H) np.ndarray
    query_embeddings = encoder.encode([queries[q] for q in query_ids])  # (Q, H)
    top = {w: [] for w in weights}
    for q0 in range(0, len(query_ids), query_chunk):
        lexical = _min_max(_bm25_scores(retriever, query_tokens[q0:q0 + query_chunk]))
        dense = _min_max(query_embeddings[q0:q0 + query_chunk] @ corpus_embeddings.T)  # (q, N), as search ranks
        for w in weights:
            top[w].extend(_top_k((1 - w) * lexical + w * dense, min(k, len(doc_ids))).tolist())
    def result(w, splits):
        rankings = {q: [doc_ids[i] for i in row] for q, row in zip(query_ids, top[w])}
        return retrieval_result(rankings, splits, len(doc_ids), f"BM25 + {encoder.name}", name, start)

    # the choice reads validation only; the other splits are scored once, at the chosen w
    by_weight = {w: result(w, {"validation": qrels_by_split["validation"]})["validation"]["ndcg_at_10"]
                 for w in weights}
    best = max(weights, key=lambda w: (by_weight[w], -w))
    return dict(result(best, qrels_by_split), weight=best, validation_ndcg_by_weight=by_weight,
                seconds=time.time() - start)
