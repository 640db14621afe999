import gzip
import json
import os
import random
from pathlib import Path

import pytest
import torch

# Tests never reach a hub; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config_kwargs(**overrides):
    """A model small enough that a forward + backward takes milliseconds on one CPU core."""
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        predictor_hidden_size=16,
        predictor_num_hidden_layers=2,
        predictor_num_attention_heads=2,
        target_num_layers=2,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_config():
    from textjepa import TextJepaConfig

    return TextJepaConfig(**tiny_config_kwargs())


# -- a tiny GLUE-style + BEIR data directory (evaluation tests, benchmark smoke tests) ----------

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "ugly"]
FILLER = ["the", "a", "movie", "film", "plot", "was", "really", "quite", "story", "actors", "and", "very"]
TOPICS = {"sport": ["ball", "goal", "team", "match", "score"], "music": ["song", "band", "guitar", "album", "tune"],
          "food": ["bread", "soup", "salt", "cook", "meal"], "space": ["star", "orbit", "moon", "rocket", "planet"]}


def _sentence(rng, words, n_filler=4):
    tokens = [rng.choice(FILLER) for _ in range(n_filler)] + list(words)
    rng.shuffle(tokens)
    return " ".join(tokens)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_eval_data_dir(root):
    """A sentiment task (single sentence, 2 labels), a similarity task (pairs, score) and a BEIR set,
    laid out like ../shared/data: <root>/eval/<task>/{split}.jsonl + task.json, <root>/retrieval/toy."""
    root = Path(root)
    rng = random.Random(0)
    sentiment = root / "eval" / "sentiment"
    sentiment.mkdir(parents=True)
    for split, n in (("train", 60), ("validation", 24), ("test", 24)):
        rows = []
        for i in range(n):
            label = i % 2
            words = rng.sample(POSITIVE if label else NEGATIVE, 2)
            rows.append({"sentence": _sentence(rng, words), "label": label})
        write_jsonl(sentiment / f"{split}.jsonl", rows)
    (sentiment / "task.json").write_text(json.dumps({"kind": "single_sentence", "keys": ["sentence", None],
                                                     "num_labels": 2, "metric": "accuracy"}))
    similar = root / "eval" / "similar"
    similar.mkdir(parents=True)
    topic_names = list(TOPICS)
    for split, n in (("train", 40), ("validation", 20), ("test", 20)):
        rows = []
        for i in range(n):
            a, b = rng.choice(topic_names), rng.choice(topic_names)
            rows.append({"sentence1": _sentence(rng, rng.sample(TOPICS[a], 3), 2),
                         "sentence2": _sentence(rng, rng.sample(TOPICS[b], 3), 2), "label": 4.5 if a == b else 0.5})
        write_jsonl(similar / f"{split}.jsonl", rows)
    (similar / "task.json").write_text(json.dumps({"kind": "sentence_pair", "keys": ["sentence1", "sentence2"],
                                                   "num_labels": 1, "metric": "spearman"}))
    beir = root / "retrieval" / "toy"
    (beir / "qrels").mkdir(parents=True)
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for t, topic in enumerate(topic_names):
        for j in range(4):
            corpus.append({"_id": f"d{t}_{j}", "title": topic, "text": " ".join(rng.sample(TOPICS[topic], 3))})
        queries.append({"_id": f"q{t}", "text": " ".join(rng.sample(TOPICS[topic], 2))})
        qrels += [f"q{t}\td{t}_0\t1", f"q{t}\td{t}_1\t2"]
    with gzip.open(beir / "corpus.jsonl.gz", "wt") as f:  # .gz accepted
        f.writelines(json.dumps(row) + "\n" for row in corpus)
    write_jsonl(beir / "queries.jsonl", queries)
    (beir / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return root


