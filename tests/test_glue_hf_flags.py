"""HF run_glue_no_trainer.py parity of textjepa.evaluation.glue: --checkpointing_steps / --resume_from_checkpoint
(a resumed run ends exactly as the uninterrupted one), all_results.json, --pad_to_max_length, --trust_remote_code,
--ignore_mismatched_sizes, --with_tracking / --report_to, and the programs' names in --help. Tiny generated task,
tiny random models."""

import json
import runpy
import shutil
import sys
import warnings

import pytest
import torch
from test_evaluation import data_dir, tokenizer_dir  # noqa: F401  (module-scoped fixtures)

import textjepa
from textjepa.evaluation import glue
from textjepa.evaluation.glue import main as glue_main

def tiny_config(tokenizer, **overrides):
    return textjepa.TextJepaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                   predictor_hidden_size=16, predictor_num_hidden_layers=1,
                                   predictor_num_attention_heads=2, target_num_layers=1, **overrides)


@pytest.fixture(scope="module")
def dropout_dir(tokenizer_dir, tmp_path_factory):  # noqa: F811
    """A random encoder with dropout, so that a resumed run also has to continue the RNG where it stopped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dropout")
    textjepa.TextJepaModel(tiny_config(tokenizer, hidden_dropout_prob=0.1)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def glue_argv(model, task, out, *extra):
    return ["--model_name_or_path", str(model), "--train_file", str(task / "train.jsonl"),
            "--validation_file", str(task / "validation.jsonl"), "--test_file", str(task / "test.jsonl"),
            "--output_dir", str(out), "--no_progress", "--seed", "0", "--learning_rate", "3e-3", *extra]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_from_checkpoint_ends_as_the_uninterrupted_run(dropout_dir, data_dir, tmp_path, monkeypatch):  # noqa: F811
    from accelerate import Accelerator

    task = data_dir / "eval" / "sentiment"  # 60 train examples: 8 batches of 8 per epoch, 16 steps in 2 epochs
    argv = ["--num_train_epochs", "2", "--checkpointing_steps", "5"]
    glue_main(glue_argv(dropout_dir, task, tmp_path / "whole", *argv))
    assert sorted(p.name for p in (tmp_path / "whole").glob("step_*")) == ["step_10", "step_15", "step_5"]

    save_state = Accelerator.save_state

    def stop_after_step_5(self, output_dir=None, **kwargs):  # the process dies right after writing step_5
        save_state(self, output_dir, **kwargs)
        if output_dir.endswith("step_5"):
            raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", stop_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        glue_main(glue_argv(dropout_dir, task, tmp_path / "stopped", *argv))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "stopped").glob("step_*")] == ["step_5"]  # mid-epoch 0 (5 of 8 batches)
    glue_main(glue_argv(dropout_dir, task, tmp_path / "resumed", *argv,
                        "--resume_from_checkpoint", str(tmp_path / "stopped" / "step_5")))

    whole, resumed = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "resumed"))
    assert resumed["history"] == whole["history"] and resumed["test_predictions"] == whole["test_predictions"]
    for step in ("step_10", "step_15"):  # the weights after the resumed steps, bit for bit
        expected, got = weights(tmp_path / "whole" / step), weights(tmp_path / "resumed" / step)
        assert all(torch.equal(expected[k], got[k]) for k in expected), step

    # epoch checkpoints: epoch_N folders; resuming from epoch_0 trains epoch 1 only, to the same end
    glue_main(glue_argv(dropout_dir, task, tmp_path / "epochs", "--num_train_epochs", "2", "--checkpointing_steps", "epoch"))
    assert sorted(p.name for p in (tmp_path / "epochs").glob("epoch_*")) == ["epoch_0", "epoch_1"]
    glue_main(glue_argv(dropout_dir, task, tmp_path / "from_epoch", "--num_train_epochs", "2",
                        "--resume_from_checkpoint", str(tmp_path / "epochs" / "epoch_0")))
    from_epoch = json.loads((tmp_path / "from_epoch" / "results.json").read_text())
    assert from_epoch["history"] == whole["history"] and from_epoch["test_predictions"] == whole["test_predictions"]


def test_all_results_json_and_pad_to_max_length(dropout_dir, data_dir, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    task = data_dir / "eval" / "sentiment"
    lengths = []  # the sequence length every embedding table is looked up with

    def record(module, args):
        if isinstance(module, torch.nn.Embedding):
            lengths.append(args[0].shape[-1])

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        glue_main(glue_argv(dropout_dir, task, tmp_path / "out", "--num_train_epochs", "1", "--max_length", "24",
                            "--pad_to_max_length"))
    finally:
        hook.remove()
    longest = max(len(ids) for ids in AutoTokenizer.from_pretrained(dropout_dir)(
        [json.loads(line)["sentence"] for line in (task / "train.jsonl").read_text().splitlines()])["input_ids"])
    assert longest < 24 and lengths and set(lengths) == {24}  # dynamic padding would have given `longest`

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    hf = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert set(hf) == {f"{prefix}_{metric}" for prefix in ("eval", "test") for metric in ("accuracy", "f1", "matthews")}
    for prefix, split in (("eval", "validation"), ("test", "test")):  # HF's scale: fractions, not x100
        for metric, value in results[split].items():
            assert hf[f"{prefix}_{metric}"] == pytest.approx(value / 100.0, abs=1e-12)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies trust_remote_code modules here rather than into the user's cache."""
    from transformers import dynamic_module_utils

    cache = str(tmp_path / "modules")
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", cache)
    monkeypatch.syspath_prepend(cache)
    yield cache
    for name in [name for name in sys.modules if name.startswith("transformers_modules")]:
        del sys.modules[name]


def test_trust_remote_code_and_ignore_mismatched_sizes(tokenizer_dir, data_dir, tmp_path, modules_cache):  # noqa: F811
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    export = tmp_path / "export"  # config.json's auto_map names the modeling files copied beside the weights
    textjepa.TextJepaForPreTraining(tiny_config(tokenizer)).export_encoder(export, auto_map=True)
    tokenizer.save_pretrained(export)
    # the same files under a model type no imported package registers: only its own code can load it
    custom = tmp_path / "custom_type"
    shutil.copytree(export, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "textjepa_custom"}))
    task = data_dir / "eval" / "sentiment"
    classes = []

    def record(module, args):
        if type(module).__name__ == "TextJepaForSequenceClassification":
            classes.append(type(module).__module__)

    def run(model, *flags):
        classes.clear()
        glue_main(glue_argv(model, task, tmp_path / "out", "--num_train_epochs", "1", "--max_train_samples", "8", *flags))
        return set(classes)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        assert run(export) == {"textjepa.modeling_textjepa"}  # textjepa is imported: no flag needed (HF's default)
        with pytest.raises(ValueError, match="custom_type: its config.json names code of its own .* pass --trust_remote_code"):
            run(custom)
        with pytest.raises(ValueError, match="pass --trust_remote_code"):
            run(custom, "--trust_remote_code", "false")
        remote = run(custom, "--trust_remote_code")
        assert len(remote) == 1 and remote.pop().startswith("transformers_modules.custom_type."), classes
    finally:
        hook.remove()

    # a 3-label classifier finetuned on the 2-label task: refused with the flag named, accepted with it
    three = tmp_path / "three_labels"
    AutoModelForSequenceClassification.from_pretrained(export, num_labels=3).save_pretrained(three)
    tokenizer.save_pretrained(three)
    with pytest.raises(ValueError, match="pass --ignore_mismatched_sizes"):
        glue_main(glue_argv(three, task, tmp_path / "refused", "--num_train_epochs", "1"))
    glue_main(glue_argv(three, task, tmp_path / "new_head", "--num_train_epochs", "1", "--max_train_samples", "8",
                        "--ignore_mismatched_sizes"))
    assert json.loads((tmp_path / "new_head" / "results.json").read_text())["history"]


def test_tracking_to_tensorboard_and_a_missing_tracker(dropout_dir, data_dir, tmp_path, capsys):  # noqa: F811
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - {str(t) for t in get_available_trackers()})[:1]
    task = data_dir / "eval" / "sentiment"
    glue_main(glue_argv(dropout_dir, task, tmp_path / "out", "--num_train_epochs", "2", "--with_tracking",
                        "--report_to", ",".join(["tensorboard", *missing])))
    out = capsys.readouterr().out
    if missing:
        assert f"--report_to {missing[0]}: its package is not installed; not logging to it" in out
    events = EventAccumulator(str(next((tmp_path / "out" / "glue_no_trainer").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    history = json.loads((tmp_path / "out" / "results.json").read_text())["history"]
    logged = [(e.step, e.value) for e in events.Scalars("validation_accuracy")]
    assert logged == [(h["step"], pytest.approx(h["validation"]["accuracy"])) for h in history]
    assert len(events.Scalars("train_loss")) == 2

    with pytest.raises(ValueError, match="--report_to tensorbored: expected all, or one or more"):
        glue_main(glue_argv(dropout_dir, task, tmp_path / "bad", "--with_tracking", "--report_to", "tensorbored"))


def test_flag_errors_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        glue.parse_args(["--model_name_or_path", "m", "--checkpointing_steps", "often"])
    assert "argument --checkpointing_steps: expected 'epoch' or a positive number of steps, got 'often'" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        glue.parse_args(["--model_name_or_path", "m", "--trust_remote_code", "maybe"])
    assert "argument --trust_remote_code: expected true or false, got 'maybe'" in capsys.readouterr().err
    args = glue.parse_args(["--model_name_or_path", "m"])
    assert (args.per_device_train_batch_size, args.seed, args.trust_remote_code) == (8, None, False)  # HF's defaults


def test_help_names_the_program(dropout_dir, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    from textjepa.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["glue", "--help"])
    assert capsys.readouterr().out.startswith("usage: textjepa glue ")
    # as modules (their __main__ blocks); sts and retrieval spell flags with hyphens like `textjepa evaluate`
    for module, flag in (("glue", "--model_name_or_path"), ("sts", "--task-dir"), ("retrieval", "--data-dir")):
        monkeypatch.setattr(sys, "argv", [module, "--help"])
        with warnings.catch_warnings(), pytest.raises(SystemExit):
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: this process imported the module already
            runpy.run_module(f"textjepa.evaluation.{module}", run_name="__main__")
        usage = capsys.readouterr().out
        assert usage.startswith(f"usage: python -m textjepa.evaluation.{module} ") and flag in usage, usage
    from textjepa.evaluation import sts

    # the underscore spelling sts first had still works
    assert sts.main(["--model", str(dropout_dir), "--task_dir", str(data_dir / "eval" / "similar"),
                     "--output", str(tmp_path / "sts.json")]) == 0
    assert json.loads((tmp_path / "sts.json").read_text())["mode"] == "zero_shot_sts"
