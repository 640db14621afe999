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


def textjepa_cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "textjepa.cli", *args], capture_output=True, text=True, env=env)


def test_version_and_bare_command_list_commands_in_words():
    import textjepa

    result = textjepa_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"textjepa {textjepa.__version__}"
    bare = textjepa_cli()
    assert bare.returncode == 0
    for command in ("train", "export", "evaluate", "glue", "whiten", "tokenizer"):
        assert f"\n  {command} " in bare.stdout, bare.stdout
    assert "textjepa.evaluation.suite" not in bare.stdout and "cli_main" not in bare.stdout


def test_every_evaluate_flag_has_help():
    from textjepa.evaluation.suite import build_parser

    parser = build_parser()
    missing = [action.option_strings for action in parser._actions
               if action.option_strings and not action.help]
    assert not missing, missing


@pytest.mark.parametrize("position", ["absolute", "rotary"])
def test_output_attentions_on_the_eager_path(position):
    from conftest import tiny_config_kwargs
    from textjepa import TextJepaConfig, TextJepaModel

    config = TextJepaConfig(**tiny_config_kwargs(position_embedding_type=position))
    config._attn_implementation = "eager"
    model = TextJepaModel(config).eval()
    ids = torch.randint(5, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    out = model(ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == config.num_hidden_layers
    for attention in out.attentions:
        assert attention.shape == (2, config.num_attention_heads, 9, 9)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, config.num_attention_heads, 9))
        assert attention[1, :, :, 6:].abs().max() == 0  # padding gets no attention
    # the returned attentions do not change the hidden states
    torch.testing.assert_close(out.last_hidden_state, model(ids, attention_mask=mask).last_hidden_state)


def test_evaluate_data_dir_follows_symlinked_task_folders(tmp_path):
    from conftest import make_eval_data_dir
    from textjepa.evaluation.suite import discover

    real = make_eval_data_dir(tmp_path / "real")
    linked = tmp_path / "linked"
    (linked / "eval").mkdir(parents=True)
    (linked / "retrieval").mkdir()
    for task in ("sentiment", "similar"):
        os.symlink(real / "eval" / task, linked / "eval" / task)
    os.symlink(real / "retrieval" / "toy", linked / "retrieval" / "toy")
    def relative(found, root):
        return [[os.path.relpath(path, root) for path in paths] for paths in found]

    assert relative(discover(linked), linked) == relative(discover(real), real) == [
        [os.path.join("eval", "sentiment"), os.path.join("eval", "similar")], [os.path.join("retrieval", "toy")]]
    os.symlink(linked, linked / "eval" / "loop")  # a cycle is walked once
    assert relative(discover(linked), linked)[0] == [os.path.join("eval", "sentiment"), os.path.join("eval", "similar")]
