"""The frozen linear probe the evaluation suite runs on every GLUE-style task (also `textjepa glue --mode
linear_probe`): pooled embeddings computed once per distinct text, a logistic regression (C picked on
validation) or a ridge regression for scores; pair tasks use [u, v, |u-v|, u*v]. Scores x100.
"""

import time

import numpy as np

from textjepa.evaluation.metrics import bootstrap_replicates
from textjepa.evaluation.tasks import labels_of, score, texts_of

PROBE_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
PROBE_ALPHA_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


def probe_features(encoder, spec, show_progress=False):
    """{split: (N, D) features}; every distinct text across all splits is encoded exactly once."""
    from textjepa.embedding.encoder import encode_distinct

    splits = list(spec.splits)
    text_lists = [texts for split in splits for texts in texts_of(spec, split)]  # s1, s2 (or None) per split
    embedded = encode_distinct(encoder, *text_lists, show_progress=show_progress)
    features = {}
    for i, split in enumerate(splits):
        u, v = embedded[2 * i], embedded[2 * i + 1]
        features[split] = u if v is None else np.concatenate([u, v, np.abs(u - v), u * v], axis=1)  # (N, 4H)
    return features


def linear_probe(encoder, spec, show_progress=False, c_grid=PROBE_C_GRID, alpha_grid=PROBE_ALPHA_GRID):
    """Fit on train, choose C (or ridge alpha) by the task metric on validation, report validation and test."""
    start = time.time()
    results = fit_probe(probe_features(encoder, spec, show_progress=show_progress), spec, encoder.name, c_grid,
                        alpha_grid)
    results["seconds"] = time.time() - start
    return results


def fit_probe(features, spec, model_name, c_grid=PROBE_C_GRID, alpha_grid=PROBE_ALPHA_GRID):
    """The probe on any {split: (N, D) features} (dense, or sparse like TF-IDF): standardise dense features
    with train statistics, logistic regression (ridge for scores) per grid value, keep the best on
    validation. Results x100, with a bootstrap interval of the headline metric per evaluated split.
    Sparse features (L2-normalised TF-IDF rows) are used as they are: dividing each column by its std would
    blow a bigram seen twice up to the scale of a common word (the TF-IDF probe's figures both ways:
    docs/compare_mini_30min_sif.md)."""
    import scipy.sparse
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    if not scipy.sparse.issparse(features["train"]):
        scaler = StandardScaler().fit(features["train"])
        features = {split: scaler.transform(x) for split, x in features.items()}
    labels = {split: labels_of(spec, split) for split in spec.splits}
    if not spec.is_regression and len(np.unique(labels["train"])) < 2:
        raise ValueError(f"{spec.split_files['train']}: only one class in the train split; a classifier needs two")
    best = None
    grid = alpha_grid if spec.is_regression else c_grid
    for value in grid:
        if spec.is_regression:
            model = Ridge(alpha=value)
        else:
            model = LogisticRegression(C=value, max_iter=1000)
        model.fit(features["train"], labels["train"])
        predictions = model.predict(features["validation"])
        validation = score(spec, labels["validation"], predictions)
        if best is None or validation[spec.metric] > best[1][spec.metric]:
            best = (value, validation, model, predictions)
    value, validation, model, predictions = best
    results = {"task": spec.name, "mode": "linear_probe", "model": model_name, "metric": spec.metric,
               "alpha" if spec.is_regression else "C": value, "validation": validation,
               "num_examples": {split: len(ds) for split, ds in spec.splits.items()},
               "replicates": {"validation": bootstrap_replicates(spec.metric, labels["validation"], predictions)}}
    if "test" in spec.splits:
        predictions = model.predict(features["test"])
        results["test"] = score(spec, labels["test"], predictions)
        results["replicates"]["test"] = bootstrap_replicates(spec.metric, labels["test"], predictions)
    return results
