"""Doors a new user knocks on (issue 13): save_to_disk sources, `textjepa --version`, a bare `textjepa`,
help on every `evaluate` flag, attentions on the eager path, symlinked task folders."""

import os
import subprocess
import sys

import pytest
import torch

from test_train import generated_corpus, quiet, tiny_data, tiny_recipe  # noqa: F401  (tiny_data is a fixture)
from textjepa.training import loop


@pytest.mark.parametrize("kind", ["dataset", "dataset_dict"])
def test_save_to_disk_source_loads_and_trains(tiny_data, tmp_path, kind):  # noqa: F811
    import datasets

    from textjepa.data import load_text_dataset

    documents = generated_corpus(120, seed=1).strip().split("\n\n")
    dataset = datasets.Dataset.from_dict({"body": documents, "id": list(range(len(documents)))})
    saved = tmp_path / "saved"
    if kind == "dataset":
        dataset.save_to_disk(str(saved))
    else:
        datasets.DatasetDict(train=dataset, test=dataset.select(range(5))).save_to_disk(str(saved))
    assert load_text_dataset(str(saved), text_column="body")["text"] == documents  # the train split, in order
    recipe = tiny_recipe(tiny_data, tmp_path / "run", **{
        "data.packed_path": None, "data.source": str(saved), "data.text_column": "body", "train.max_steps": 3})
    summary = loop.train(recipe, announce=quiet)
    assert summary["steps"] == 3
