"""Finetune options of textjepa.evaluation.glue: bi-encoder pair heads, warmup ratio, layer-wise learning-rate
decay, early stopping, train/validation caps. Tiny generated tasks, tiny random models."""

import json
import math

import pytest
import torch
from test_evaluation import data_dir, jepa_dir, tokenizer_dir  # noqa: F401  (module-scoped fixtures)

from textjepa.evaluation.glue import finetune, layer_depth, parameter_groups, parse_args
from textjepa.evaluation.glue import main as glue_main
from textjepa.evaluation.tasks import load_task_dir


def finetune_args(**overrides):
    args = parse_args(["--model_name_or_path", "unused", "--no_progress", "--seed", "0", "--max_length", "32",
                       "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture
def opposite_task(data_dir, tmp_path):  # noqa: F811
    """The similarity pairs scored the other way round (same topic -> 0.5), validation = train: a random
    encoder's cosines rank them backwards (shared words), so only training turns the score positive."""
    rows = [json.loads(line) for line in (data_dir / "eval" / "similar" / "train.jsonl").read_text().splitlines()]
    task = tmp_path / "opposite"
    task.mkdir()
    for split in ("train", "validation", "test"):
        (task / f"{split}.jsonl").write_text("".join(json.dumps({**r, "label": 5.0 - r["label"]}) + "\n" for r in rows))
    (task / "task.json").write_text(json.dumps({"keys": ["sentence1", "sentence2"], "num_labels": 1}))
    return load_task_dir(task)


@pytest.mark.parametrize("head", ["cosine", "concat"])
def test_bi_encoder_learns_pair_scores(jepa_dir, opposite_task, head):  # noqa: F811
    untrained = finetune(jepa_dir, opposite_task, finetune_args(pair_head=head, learning_rate=0.0, num_train_epochs=1))
    if head == "cosine":
        assert untrained["validation"]["spearman"] < 0.0
        assert all(-1.0 <= p <= 1.0 for p in untrained["test_predictions"])  # cosines, whatever the label range
    tuned = finetune(jepa_dir, opposite_task, finetune_args(pair_head=head, learning_rate=3e-3, num_train_epochs=6))
    assert tuned["pair_head"] == head and len(tuned["test_predictions"]) == 40
    # 75 is the ceiling: Spearman of a perfect ranking against two tied score levels (1 in 4 pairs same topic)
    assert tuned["validation"]["spearman"] >= 65.0, tuned["history"]


def test_concat_head_classifies_pairs_and_cosine_refuses(jepa_dir, data_dir, tmp_path):  # noqa: F811
    rows = [json.loads(line) for line in (data_dir / "eval" / "similar" / "train.jsonl").read_text().splitlines()]
    task = tmp_path / "same_topic"
    task.mkdir()
    for split in ("train", "validation"):
        (task / f"{split}.jsonl").write_text("".join(json.dumps({**r, "label": int(r["label"] > 2)}) + "\n"
                                                     for r in rows))
    (task / "task.json").write_text(json.dumps({"keys": ["sentence1", "sentence2"], "num_labels": 2}))
    spec = load_task_dir(task)
    tuned = finetune(jepa_dir, spec, finetune_args(pair_head="concat", num_train_epochs=1))
    assert tuned["pair_head"] == "concat" and set(tuned["validation"]) == {"accuracy", "f1", "matthews"}
    with pytest.raises(ValueError, match="--pair_head cosine scores a regression task; same_topic has 2 labels"):
        finetune(jepa_dir, spec, finetune_args(pair_head="cosine"))


def test_layerwise_lr_decay_groups():
    import textjepa
    from conftest import tiny_config_kwargs
    from transformers import AutoModelForSequenceClassification

    config = textjepa.TextJepaConfig(**tiny_config_kwargs(num_labels=2))  # 3 layers
    model = AutoModelForSequenceClassification.from_config(config)
    assert layer_depth("textjepa.embeddings.word_embeddings.weight", 3) == 0
    assert layer_depth("textjepa.layers.2.attention.qkv.weight", 3) == 3
    assert layer_depth("encoder.encoder.layer.0.output.dense.weight", 6) == 1  # BERT names
    assert layer_depth("classifier.weight", 3) == 4
    lr_of = {}
    for group in parameter_groups(model, 1e-3, 0.01, layerwise_lr_decay=0.5):
        for parameter in group["params"]:
            lr_of[parameter] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert lr_of[named["classifier.weight"]] == (1e-3, 0.01)
    assert lr_of[named["textjepa.layers.2.intermediate.weight"]] == (pytest.approx(5e-4), 0.01)
    assert lr_of[named["textjepa.layers.0.intermediate.bias"]] == (pytest.approx(1.25e-4), 0.0)
    assert lr_of[named["textjepa.embeddings.word_embeddings.weight"]] == (pytest.approx(1e-3 / 16), 0.01)
    assert len(lr_of) == len(named)
    flat = parameter_groups(model, 1e-3, 0.0)  # no decay: every parameter at the base lr
    assert {g["lr"] for g in flat} == {1e-3}


def test_early_stopping_warmup_ratio_and_caps(jepa_dir, data_dir, tmp_path):  # noqa: F811
    spec = load_task_dir(data_dir / "eval" / "sentiment")
    # lr 0: validation never improves after epoch 0, so patience 1 stops after epoch 1 of 5
    stopped = finetune(jepa_dir, spec, finetune_args(learning_rate=0.0, num_train_epochs=5, early_stopping_patience=1,
                                                     warmup_ratio=0.25))
    assert [h["epoch"] for h in stopped["history"]] == [0, 1] and stopped["best_epoch"] == 0
    assert stopped["warmup_steps"] == math.ceil(0.25 * 5 * math.ceil(60 / 8))

    task = data_dir / "eval" / "sentiment"
    out = tmp_path / "out"
    glue_main(["--model_name_or_path", str(jepa_dir), "--train_file", str(task / "train.jsonl"),
               "--validation_file", str(task / "validation.jsonl"), "--test_file", str(task / "test.jsonl"),
               "--num_train_epochs", "1", "--max_train_samples", "16", "--max_eval_samples", "8",
               "--warmup_ratio", "0.5", "--layerwise_lr_decay", "0.8", "--output_dir", str(out), "--no_progress",
               "--per_device_train_batch_size", "32", "--seed", "42"])  # the defaults before HF's (8, unseeded)
    results = json.loads((out / "results.json").read_text())
    assert results["num_examples"] == {"train": 16, "validation": 8, "test": 24}
    assert results["warmup_steps"] == 1 and len(results["test_predictions"]) == 24


def test_bi_encoder_save_model(jepa_dir, data_dir, tmp_path):  # noqa: F811
    from transformers import AutoModel

    spec = load_task_dir(data_dir / "eval" / "similar")
    out = tmp_path / "saved"
    finetune(jepa_dir, spec, finetune_args(pair_head="concat", num_train_epochs=1, save_model=True, output_dir=str(out)))
    head = torch.load(out / "pair_head.pt")
    assert set(head) == {"classifier.weight", "classifier.bias"}
    assert type(AutoModel.from_pretrained(out)).__name__ == "TextJepaModel"


def test_bi_encoder_applies_the_shipped_post_processing(jepa_dir, data_dir, tmp_path):  # noqa: F811
    """An export with SIF token weights and whitening: the untrained cosine head scores every test pair as
    the cosine of SentenceEncoder's (shipped) vectors; --post_processing none pools the raw states."""
    import shutil

    import numpy as np

    from textjepa.embedding.encoder import SentenceEncoder
    from textjepa.embedding.postprocessing import save_token_weights, save_whitening

    shipped = tmp_path / "shipped"
    shutil.copytree(jepa_dir, shipped)
    rng = np.random.default_rng(0)
    hidden = json.loads((shipped / "config.json").read_text())["hidden_size"]
    vocab = SentenceEncoder(str(shipped)).tokenizer
    save_token_weights(shipped, rng.uniform(0.1, 1.0, len(vocab)).astype(np.float32))
    save_whitening(shipped, rng.normal(size=hidden).astype(np.float32),
                   (np.eye(hidden) + 0.3 * rng.normal(size=(hidden, hidden))).astype(np.float32))
    spec = load_task_dir(data_dir / "eval" / "similar")
    untrained = finetune(str(shipped), spec, finetune_args(pair_head="cosine", learning_rate=0.0, num_train_epochs=1))
    assert untrained["post_processing"] == ["token_weights", "whitening"]
    encoder = SentenceEncoder(str(shipped), max_length=32)
    first, second = (encoder.encode(spec.splits["test"][key]) for key in ("sentence1", "sentence2"))
    expected = (first * second).sum(axis=1)  # both L2-normalised: the cosine
    assert np.allclose(untrained["test_predictions"], expected, atol=1e-4)
    raw = finetune(str(shipped), spec, finetune_args(pair_head="cosine", learning_rate=0.0, num_train_epochs=1,
                                                     post_processing="none"))
    assert raw["post_processing"] == [] and not np.allclose(raw["test_predictions"], expected, atol=1e-2)
