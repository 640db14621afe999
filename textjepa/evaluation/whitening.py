"""Whitening of pooled sentence vectors: fit once on unlabeled text, apply before L2-normalising.

    mean, matrix = fit_whitening(vectors)          # vectors: (N, H) raw (un-normalised) pooled embeddings
    white = apply_whitening(x, mean, matrix)       # (x - mean) @ matrix
    save_whitening(model_dir, mean, matrix)        # model_dir/whitening.safetensors: SentenceEncoder applies it
                                                   # (and an export's sentence-transformers Dense module)
    ship_whitening(model_dir, "corpus/*.parquet")  # fit on a sample of unlabeled text and save it beside the model
    textjepa whiten --model DIR --on 'corpus/*.parquet' [--max-docs 8800]   # the same from the shell

ZCA whitening: matrix = U diag(1 / sqrt(s + eps * mean(s))) U^T from the eigendecomposition of the
covariance, so the whitened vectors have (nearly) identity covariance and stay in the original basis.
The relative eps keeps near-empty directions (rank-deficient covariances, e.g. fewer documents than
dimensions) from being blown up into noise. A model directory that holds whitening.safetensors (keys
`mean` (H,), `matrix` (H, H)) is evaluated as shipped: SentenceEncoder applies it to every vector.
"""

import os

import numpy as np

WHITENING_FILE = "whitening.safetensors"


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


def save_whitening(model_dir, mean, matrix):
    """Write model_dir/whitening.safetensors atomically (a temp file renamed over it)."""
    from safetensors.numpy import save_file

    path = os.path.join(str(model_dir), WHITENING_FILE)
    temporary = path + ".tmp"
    save_file({"mean": np.ascontiguousarray(mean, dtype=np.float32),
               "matrix": np.ascontiguousarray(matrix, dtype=np.float32)}, temporary)
    os.replace(temporary, path)
    _refresh_sentence_transformers_layout(model_dir)
    return path


def _refresh_sentence_transformers_layout(model_dir):
    """Keep an export's sentence-transformers Dense module equal to the whitening it ships (or absent)."""
    from textjepa.evaluation.sentence_transformers_export import (
        has_sentence_transformers_layout,
        write_sentence_transformers_layout,
    )

    if has_sentence_transformers_layout(model_dir):
        write_sentence_transformers_layout(model_dir)


def ship_whitening(model_dir, source, max_docs=8_800):
    """Fit whitening on the model's raw pooled vectors of up to max_docs unlabeled texts from `source`
    and save it in model_dir, so every SentenceEncoder (and the suite) uses it as part of the model.
    An existing whitening file is replaced (the fit always starts from the raw vectors)."""
    from textjepa.evaluation.embedding import SentenceEncoder

    path = os.path.join(str(model_dir), WHITENING_FILE)
    if os.path.exists(path):
        os.remove(path)
        _refresh_sentence_transformers_layout(model_dir)
    texts = read_unlabeled_texts(source, max_docs)
    vectors = SentenceEncoder(str(model_dir)).encode(texts, normalize=False)
    return save_whitening(model_dir, *fit_whitening(vectors))


def load_whitening(model_dir):
    """(mean, matrix) from model_dir/whitening.safetensors, or None when the file is absent."""
    from safetensors.numpy import load_file

    path = os.path.join(str(model_dir), WHITENING_FILE)
    if not os.path.isfile(path):
        return None
    try:
        tensors = load_file(path)
    except Exception as error:  # SafetensorError and friends: say which file
        raise ValueError(f"{path}: not a readable safetensors file: {error}") from error
    if set(tensors) != {"mean", "matrix"}:
        raise ValueError(f"{path}: keys {sorted(tensors)}; expected exactly 'mean' (H,) and 'matrix' (H, H)")
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


def main(argv=None):
    """textjepa whiten --model DIR --on FILE_OR_GLOB [--max-docs N]: ship whitening inside a model directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="textjepa whiten", description=main.__doc__)
    parser.add_argument("--model", required=True, help="encoder directory (an export); whitening.safetensors goes here")
    parser.add_argument("--on", required=True, metavar="FILE_OR_GLOB", help="unlabeled text: txt/jsonl/csv/parquet")
    parser.add_argument("--max-docs", type=int, default=8_800, help="texts sampled evenly across files (500 chars each)")
    args = parser.parse_args(argv)
    print(f"wrote {ship_whitening(args.model, args.on, args.max_docs)}")
    return 0
