"""Post-processing of pooled sentence vectors, fitted once on unlabeled text and shipped in the model
directory: SIF token weights for the mean pooling, then whitening, then L2 normalisation.

    mean, matrix = fit_whitening(vectors)          # vectors: (N, H) raw (un-normalised) pooled embeddings
    white = apply_whitening(x, mean, matrix)       # (x - mean) @ matrix
    save_whitening(model_dir, mean, matrix)        # model_dir/whitening.safetensors: SentenceEncoder applies it
    weights = fit_sif_weights(tokenizer, texts)    # (V,) a / (a + p(token)), p counted on the texts
    save_token_weights(model_dir, weights)         # model_dir/token_weights.safetensors: weighted mean pooling

ship_whitening(model_dir, "corpus/*.parquet", token_weights="sif") and `textjepa whiten --model DIR --on GLOB
[--token-weights sif|none]` fit both on a sample of unlabeled text with the model's own SentenceEncoder and
save them beside the model; they live in encoder.py, beside the encoder they run.

SIF weights (Arora et al. 2017, "smooth inverse frequency"): the mean pooling becomes a weighted mean
with weight a / (a + p(t)) for token t of unigram probability p(t), so frequent tokens (function words,
punctuation, special tokens) count less than rare, content-bearing ones; a = 1e-3. Unseen tokens weigh 1.

ZCA whitening: matrix = U diag(1 / sqrt(s + eps * mean(s))) U^T from the eigendecomposition of the
covariance, so the whitened vectors have (nearly) identity covariance and stay in the original basis.
The relative eps keeps near-empty directions (rank-deficient covariances, e.g. fewer documents than
dimensions) from being blown up into noise. A model directory that holds whitening.safetensors (keys
`mean` (H,), `matrix` (H, H)) is evaluated as shipped: SentenceEncoder applies it to every vector.
"""

import os

import numpy as np

WHITENING_FILE = "whitening.safetensors"
TOKEN_WEIGHTS_FILE = "token_weights.safetensors"
TOKEN_WEIGHTS = ("sif", "none")
SIF_A = 1e-3


def fit_whitening(vectors, eps=1e-3):
    """(N, H) vectors -> (mean (H,), matrix (H, H)) float32; eps is relative to the mean eigenvalue."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"fit_whitening: need (N >= 2, H) vectors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("fit_whitening: vectors contain NaN or inf")
    mean = x.mean(axis=0)
    covariance = np.cov(x - mean, rowvar=False)  # (H, H)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    scale = 1.0 / np.sqrt(eigenvalues + eps * max(eigenvalues.mean(), 1e-12))
    matrix = (eigenvectors * scale) @ eigenvectors.T
    return mean.astype(np.float32), matrix.astype(np.float32)


def apply_whitening(x, mean, matrix):
    """(N, H) -> (N, H): (x - mean) @ matrix, for numpy arrays or torch tensors alike."""
    return (x - mean) @ matrix


def _save_atomically(path, tensors):
    from safetensors.numpy import save_file

    temporary = path + ".tmp"
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, temporary)
    os.replace(temporary, path)
    return path


def save_whitening(model_dir, mean, matrix):
    """Write model_dir/whitening.safetensors atomically (a temp file renamed over it)."""
    return _save_atomically(os.path.join(str(model_dir), WHITENING_FILE), {"mean": mean, "matrix": matrix})


def fit_sif_weights(tokenizer, texts, a=SIF_A):
    """(V,) float32 SIF weights a / (a + p(t)), p the unigram frequency of token t in the tokenized texts
    (special tokens included, as the encoder sees them); tokens that never occur weigh 1."""
    vocab_size = len(tokenizer)
    counts = np.zeros(vocab_size, dtype=np.float64)
    for ids in tokenizer(list(texts), truncation=False)["input_ids"]:
        np.add.at(counts, np.asarray(ids, dtype=np.int64), 1.0)
    if counts.sum() == 0:
        raise ValueError("fit_sif_weights: the texts gave no tokens")
    return (a / (a + counts / counts.sum())).astype(np.float32)


def save_token_weights(model_dir, weights):
    """Write model_dir/token_weights.safetensors ("weights": (V,)) atomically."""
    return _save_atomically(os.path.join(str(model_dir), TOKEN_WEIGHTS_FILE), {"weights": weights})


def load_token_weights(model_dir, vocab_size=None):
    """(V,) float32 token weights from model_dir/token_weights.safetensors, or None when absent."""
    tensors = _load(os.path.join(str(model_dir), TOKEN_WEIGHTS_FILE), {"weights"}, "'weights' (V,)")
    if tensors is None:
        return None
    weights = tensors["weights"].astype(np.float32)
    path = os.path.join(str(model_dir), TOKEN_WEIGHTS_FILE)
    if weights.ndim != 1 or (vocab_size is not None and weights.shape[0] < vocab_size):
        raise ValueError(f"{path}: weights {weights.shape}; expected (V,) with V >= the tokenizer's {vocab_size} tokens")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"{path}: weights must be finite and >= 0")
    return weights


def _load(path, keys, expected):
    """{key: array} from a safetensors file, None when it is absent; a named error when it is unreadable."""
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        return None
    try:
        tensors = load_file(path)
    except Exception as error:  # SafetensorError and friends: say which file
        raise ValueError(f"{path}: not a readable safetensors file: {error}") from error
    if set(tensors) != keys:
        raise ValueError(f"{path}: keys {sorted(tensors)}; expected exactly {expected}")
    return tensors


def load_whitening(model_dir):
    """(mean, matrix) from model_dir/whitening.safetensors, or None when the file is absent."""
    path = os.path.join(str(model_dir), WHITENING_FILE)
    tensors = _load(path, {"mean", "matrix"}, "'mean' (H,) and 'matrix' (H, H)")
    if tensors is None:
        return None
    mean, matrix = tensors["mean"].astype(np.float32), tensors["matrix"].astype(np.float32)
    if mean.ndim != 1 or matrix.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(f"{path}: mean {mean.shape}, matrix {matrix.shape}; expected (H,) and (H, H)")
    return mean, matrix


def read_unlabeled_texts(source, max_docs=10_000, max_chars=500, seed=0):
    """Up to max_docs texts (first max_chars characters each) from a file, directory or glob of
    txt/jsonl/csv/parquet files ("text" column; txt: blank-line separated paragraphs), sampled evenly
    across files with a fixed seed."""
    from textjepa.data import _expand_local, load_text_dataset

    files = _expand_local(str(source))
    per_file = -(-max_docs // len(files))
    rng = np.random.default_rng(seed)
    texts = []
    for path in files:
        column = load_text_dataset(path)["text"]
        rows = rng.choice(len(column), size=min(per_file, len(column)), replace=False)
        texts += [column[int(i)][:max_chars] for i in sorted(rows)]
    return texts[:max_docs]

