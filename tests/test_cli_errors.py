"""Bad inputs through every `textjepa` command: each must exit non-zero with one line on stderr that
names the file or key and what was expected, print no traceback, and delete nothing that existed.
Plus the results that used to be silent (--resume with nothing to resume, a vocabulary smaller than
asked, numeric text values) and must now be reported."""

import itertools
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_eval_data_dir
from safetensors.torch import load_file, save_file
from test_train import REPO, generated_corpus, quiet, tiny_data, tiny_recipe  # noqa: F401 (fixture)

from textjepa.cli import main as cli_main
from textjepa.training import checkpoint as ckpt
from textjepa.training import loop


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    """A finished tiny run (checkpoint + export), an eval data dir, a few data files and a recipe file."""
    root = tmp_path_factory.mktemp("world")
    run = root / "run"
    recipe = tiny_recipe(tiny_data, run, **{"train.max_steps": 2, "train.export": True})
    loop.train(recipe, announce=quiet)
    recipe.save(root / "tiny.yaml")
    make_eval_data_dir(root / "evaldata")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n\n   \n\n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "small.txt").write_text("hi.\n")
    (root / "corpus.txt").write_text(generated_corpus(60))
    (root / "shortdocs.txt").write_text("\n\n".join(f"the sea {i}." for i in range(80)) + "\n")
    (root / "rows.jsonl").write_text('{"body": "a document"}\n')
    (root / "bad.yaml").write_text("optim: [1, 2\n")
    return {"root": root, "run": run, "checkpoint": run / "checkpoint-00000002", "export": run / "export",
            "recipe": root / "tiny.yaml", "tokenizer": tiny_data["tokenizer"], "packed": tiny_data["packed"]}


def copy_of(path, tmp_path):
    target = tmp_path / Path(path).name
    shutil.copytree(path, target)
    return target


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def nan_teacher(checkpoint):
    teacher = load_file(str(checkpoint / ckpt.TEACHER_FILE))
    save_file({k: torch.full_like(v, float("nan")) for k, v in teacher.items()}, str(checkpoint / ckpt.TEACHER_FILE))


def not_a_tokenizer(folder, text):
    """A tokenizer directory whose tokenizer.json is some other JSON."""
    folder.mkdir()
    (folder / "tokenizer.json").write_text(text)
    return folder


def wrong_shape(export):
    config = json.loads((export / "config.json").read_text())
    config["intermediate_size"] = 48
    (export / "config.json").write_text(json.dumps(config))


# Each case: (id, build(world, tmp_path) -> (argv, expected text in the one error line)).
FRESH = itertools.count()


def train(w, *sets, data=None, resume=False):
    argv = ["train", "--recipe", str(w["recipe"])] + (["--resume"] if resume else [])
    fresh = w["root"] / f"fresh{next(FRESH)}"  # a new output_dir per case
    sets = list(sets) + [f"train.output_dir={fresh}"] * (not any("output_dir" in s for s in sets))
    if data is not None:  # train from text files instead of the packed blocks
        sets += ["data.packed_path=null", f"data.source={data}"]
    for item in sets:
        argv += ["--set", item]
    return argv


CASES = [
    # recipes: file, syntax, keys, types and every numeric bound
    ("recipe missing", lambda w, t: (["train", "--recipe", str(t / "nope.yaml")], "nope.yaml: recipe file not found")),
    ("recipe bad yaml", lambda w, t: (["train", "--recipe", str(w["root"] / "bad.yaml")], "bad.yaml: not valid YAML")),
    ("unknown key", lambda w, t: (train(w, "optim.lrr=1"), "unknown key 'lrr'")),
    ("wrong type", lambda w, t: (train(w, "optim.lr=abc"), "optim.lr: expected float")),
    ("override syntax", lambda w, t: (train(w, "optim.lr"), "--set optim.lr: expected KEY=VALUE")),
    ("negative lr", lambda w, t: (train(w, "optim.lr=-1e-3"), "optim.lr: expected a number > 0")),
    ("negative min_lr", lambda w, t: (train(w, "optim.min_lr=-1e-5"), "optim.min_lr: expected a number >= 0")),
    ("min_lr above lr", lambda w, t: (train(w, "optim.min_lr=1.0"), "optim.min_lr: expected at most optim.lr")),
    ("negative warmup", lambda w, t: (train(w, "optim.warmup_steps=-1"), "optim.warmup_steps")),
    ("beta of 1", lambda w, t: (train(w, "optim.betas=[0.9, 1.0]"), "optim.betas[1]: expected a number in [0, 1)")),
    ("three betas", lambda w, t: (train(w, "optim.betas=[0.9, 0.9, 0.9]"), "optim.betas: expected two numbers")),
    ("zero eps", lambda w, t: (train(w, "optim.eps=0"), "optim.eps: expected a number > 0")),
    ("nan eps", lambda w, t: (train(w, "optim.eps=.nan"), "optim.eps")),
    ("negative weight decay", lambda w, t: (train(w, "optim.weight_decay=-0.1"), "optim.weight_decay:")),
    ("negative weight decay end", lambda w, t: (train(w, "optim.weight_decay_end=-1"), "optim.weight_decay_end:")),
    ("negative grad clip", lambda w, t: (train(w, "optim.grad_clip=-1"), "optim.grad_clip:")),
    ("momentum above 1", lambda w, t: (train(w, "ema.momentum_start=1.5"), "ema.momentum_start: expected a number in [0, 1]")),
    ("momentum falling", lambda w, t: (train(w, "ema.momentum_start=0.999", "ema.momentum_end=0.99"), "ema.momentum_start: expected at most")),
    ("target ratio", lambda w, t: (train(w, "mask.target_ratio=1.5"), "mask.target_ratio: expected a number in (0, 1)")),
    ("mlm probability", lambda w, t: (train(w, "mask.mlm_probability=0"), "mask.mlm_probability")),
    ("zero spans", lambda w, t: (train(w, "mask.num_spans=0"), "mask.num_spans: expected a number >= 1")),
    ("zero masks", lambda w, t: (train(w, "mask.num_masks=0"), "mask.num_masks")),
    ("context drop of 1", lambda w, t: (train(w, "mask.extra_context_drop=1.0"), "mask.extra_context_drop")),
    ("dropout of 1", lambda w, t: (train(w, "model.hidden_dropout_prob=1.0"), "model.hidden_dropout_prob")),
    ("heads do not divide", lambda w, t: (train(w, "model.num_attention_heads=3"), "model.hidden_size: 32 is not divisible")),
    ("too many target layers", lambda w, t: (train(w, "model.target_num_layers=5"), "model.target_num_layers: expected at most")),
    ("zero steps", lambda w, t: (train(w, "train.max_steps=0"), "train.max_steps")),
    ("zero batch", lambda w, t: (train(w, "train.batch_size=0"), "train.batch_size")),
    ("zero save_every", lambda w, t: (train(w, "train.save_every=0"), "train.save_every")),
    ("zero keep_last", lambda w, t: (train(w, "train.keep_last=0"), "train.keep_last")),
    ("negative minutes", lambda w, t: (train(w, "train.max_minutes=-1"), "train.max_minutes")),
    ("validation fraction 1", lambda w, t: (train(w, "data.validation_fraction=1.0"), "data.validation_fraction")),
    ("tiny vocab", lambda w, t: (train(w, "data.vocab_size=3"), "data.vocab_size")),
    ("bad precision", lambda w, t: (train(w, "train.mixed_precision=fp8"), "train.mixed_precision: expected one of")),
    # data and tokenizer
    ("empty source file", lambda w, t: (train(w, data=w["root"] / "empty.txt"), "empty.txt: the file is empty")),
    ("blank-lines source", lambda w, t: (train(w, data=w["root"] / "blank.txt"), "no non-empty documents")),
    ("missing source", lambda w, t: (train(w, data=t / "nothing.txt"), "nothing.txt' does not exist")),
    ("glob matches nothing", lambda w, t: (train(w, data=f"{t}/*.parquet"), "matched no files")),
    ("non-utf8 source", lambda w, t: (train(w, data=w["root"] / "latin1.txt"), "latin1.txt: bytes at offset 3")),
    ("missing text column", lambda w, t: (train(w, data=w["root"] / "rows.jsonl"), "text column 'text' not found")),
    ("short validation split", lambda w, t: (train(w, "data.validation_fraction=0.01", data=w["root"] / "shortdocs.txt"),
                                             "raise data.validation_fraction")),
    ("corpus under one block", lambda w, t: (train(w, "data.validation_fraction=0", data=w["root"] / "small.txt"),
                                             "fewer than one block of block_size=32")),
    ("tokenizer missing", lambda w, t: (train(w, f"data.tokenizer={t}/no/such/tok"), "no/such/tok' does not exist")),
    ("tokenizer dir without files", lambda w, t: (train(w, f"data.tokenizer={t}"), "holds no tokenizer files")),
    ("tokenizer.json of {}", lambda w, t: (train(w, f"data.tokenizer={not_a_tokenizer(t / 'tok', '{}')}"),
                                           f"{t}/tok/tokenizer.json: not a tokenizer (Model missing.")),
    ("tokenizer.json of a list", lambda w, t: (train(w, f"data.tokenizer={not_a_tokenizer(t / 'tok', '[1, 2]')}"),
                                               f"{t}/tok/tokenizer.json: not a tokenizer (invalid type: sequence")),
    ("packed path missing", lambda w, t: (train(w, f"data.packed_path={t}/packed"), f"{t}/packed")),
    ("block longer than positions", lambda w, t: (train(w, "model.max_position_embeddings=16"),
                                                  "block_size=32 is longer than the model's max_position_embeddings=16")),
    ("batch larger than data", lambda w, t: (train(w, "train.batch_size=100000"), "fewer than one global batch")),
    # run directories
    ("existing run without --resume", lambda w, t: (train(w, f"train.output_dir={copy_of(w['run'], t)}"), "pass --resume")),
    ("resume from bad trainer_state", lambda w, t: (
        train(w, f"train.output_dir={(r := copy_of(w['run'], t))}", resume=True),
        (r / "checkpoint-00000002" / "trainer_state.json").write_text("{oops") and "trainer_state.json: unreadable")),
    ("resume from truncated weights", lambda w, t: (
        train(w, f"train.output_dir={(r := copy_of(w['run'], t))}", resume=True),
        truncate(r / "checkpoint-00000002" / "model.safetensors") or "model.safetensors: corrupt or truncated")),
    ("resume after the model's size changed", lambda w, t: (
        train(w, f"train.output_dir={copy_of(w['run'], t)}", "model.intermediate_size=128", resume=True),
        "model.intermediate_size is 128 in the recipe but 64 in the checkpoint")),
    ("resume after the model changed, checkpoint without recipe", lambda w, t: (
        train(w, f"train.output_dir={(r := copy_of(w['run'], t))}", "model.intermediate_size=128", resume=True),
        (r / "checkpoint-00000002" / "recipe.yaml").unlink() or "does not fit this checkpoint (size mismatch for")),
    # export
    ("export nothing there", lambda w, t: (["export", "--checkpoint", str(t / "none"), "--output", str(t / "o")],
                                           "is neither a checkpoint nor a run directory")),
    ("export missing weights", lambda w, t: (["export", "--checkpoint", str(c := copy_of(w["checkpoint"], t)), "--output", str(t / "o")],
                                             (c / "model.safetensors").unlink() or "model.safetensors: missing")),
    ("export bad trainer_state", lambda w, t: (["export", "--checkpoint", str(c := copy_of(w["checkpoint"], t)), "--output", str(t / "o")],
                                               (c / "trainer_state.json").write_text('["step"]') and "trainer_state.json: expected")),
    ("export truncated teacher", lambda w, t: (["export", "--checkpoint", str(c := copy_of(w["checkpoint"], t)), "--output", str(t / "o")],
                                               truncate(c / "teacher.safetensors") or "teacher.safetensors: corrupt or truncated")),
    ("export NaN weights", lambda w, t: (["export", "--checkpoint", str(c := copy_of(w["checkpoint"], t)), "--output", str(t / "o")],
                                         nan_teacher(c) or "hold NaN/Inf")),
    ("export recipe mismatch", lambda w, t: (["export", "--checkpoint", str(c := copy_of(w["checkpoint"], t)), "--output", str(t / "o")],
                                             (c / "recipe.yaml").write_text((c / "recipe.yaml").read_text().replace(
                                                 "hidden_size: 32", "hidden_size: 64")) and "does not match the recipe")),
    ("export onto a file", lambda w, t: (["export", "--checkpoint", str(w["checkpoint"]), "--output", str(t / "f")],
                                         (t / "f").write_text("x") and "exists and is a file")),
    ("export onto other files", lambda w, t: (["export", "--checkpoint", str(w["checkpoint"]), "--output", str(t)],
                                              (t / "notes.txt").write_text("x") and "holds files that are not an export")),
    # evaluate
    ("evaluate missing model dir", lambda w, t: (["evaluate", "--model", "runs/none/export", "--data-dir", str(w["root"] / "evaldata")],
                                                 "runs/none/export: model directory does not exist")),
    ("evaluate dir without config", lambda w, t: (["evaluate", "--model", str(t), "--data-dir", str(w["root"] / "evaldata")],
                                                  "no config.json")),
    ("evaluate missing weights", lambda w, t: (["evaluate", "--model", str(e := copy_of(w["export"], t)), "--data-dir", str(w["root"] / "evaldata")],
                                               (e / "model.safetensors").unlink() or "expected model.safetensors")),
    ("evaluate truncated weights", lambda w, t: (["evaluate", "--model", str(e := copy_of(w["export"], t)), "--data-dir", str(w["root"] / "evaldata")],
                                                 truncate(e / "model.safetensors") or "could not load an encoder")),
    ("evaluate wrong-shape config", lambda w, t: (["evaluate", "--model", str(e := copy_of(w["export"], t)), "--data-dir", str(w["root"] / "evaldata")],
                                                  wrong_shape(e) or "could not load an encoder")),
    # tokenizer
    ("tokenizer missing source", lambda w, t: (["tokenizer", "train", "--source", str(t / "none.txt"), "--vocab-size", "100", "--output", str(t / "tok")],
                                               "none.txt' does not exist")),
    ("tokenizer empty source", lambda w, t: (["tokenizer", "train", "--source", str(w["root"] / "empty.txt"), "--vocab-size", "100", "--output", str(t / "tok")],
                                             "empty.txt: the file is empty")),
    ("tokenizer vocab too small", lambda w, t: (["tokenizer", "train", "--source", str(w["root"] / "corpus.txt"), "--vocab-size", "3", "--output", str(t / "tok")],
                                                "vocab_size=3 must exceed")),
    ("tokenizer bpe too small", lambda w, t: (["tokenizer", "train", "--source", str(w["root"] / "corpus.txt"), "--vocab-size", "100", "--model", "bpe", "--output", str(t / "tok")],
                                              "byte-level BPE needs vocab_size >= 261")),
    # glue
    ("glue missing model", lambda w, t: (["glue", "--model_name_or_path", "runs/none/export", "--train_file", str(w["root"] / "evaldata/eval/sentiment/train.jsonl"),
                                          "--validation_file", str(w["root"] / "evaldata/eval/sentiment/validation.jsonl"), "--mode", "linear_probe"],
                                         "runs/none/export: model directory does not exist")),
    ("glue missing train file", lambda w, t: (["glue", "--model_name_or_path", str(w["export"]), "--train_file", str(t / "train.jsonl"),
                                               "--validation_file", str(t / "validation.jsonl"), "--mode", "linear_probe"], "train.jsonl")),
    ("glue resume from nowhere", lambda w, t: (["glue", "--model_name_or_path", str(w["export"]), "--train_file", str(w["root"] / "evaldata/eval/sentiment/train.jsonl"),
                                                "--validation_file", str(w["root"] / "evaldata/eval/sentiment/validation.jsonl"), "--resume_from_checkpoint", str(t / "step_5")],
                                               "--resume_from_checkpoint " + str(t / "step_5") + ": not a checkpoint folder written by --checkpointing_steps")),
    ("glue unknown tracker", lambda w, t: (["glue", "--model_name_or_path", str(w["export"]), "--train_file", str(w["root"] / "evaldata/eval/sentiment/train.jsonl"),
                                            "--validation_file", str(w["root"] / "evaldata/eval/sentiment/validation.jsonl"), "--with_tracking", "--report_to", "tensorbored",
                                            "--output_dir", str(t / "out")], "--report_to tensorbored: expected all, or one or more")),
    ("unknown command", lambda w, t: (["fly"], "unknown command 'fly'")),
]


def snapshot(*roots):
    return {p for root in roots for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_named_line(world, tmp_path, capsys, case):
    _, build = case
    argv, expected = build(world, tmp_path)
    before = snapshot(world["root"], tmp_path)
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("textjepa")]
    assert len(lines) == 1, err  # one line that says what went wrong (warnings may precede it)
    assert expected in lines[0], lines[0]
    assert before <= snapshot(world["root"], tmp_path), "a bad input deleted files"


def test_debug_shows_the_traceback_and_subprocess_exit_code(world, tmp_path):
    argv = [sys.executable, "-m", "textjepa.cli", "train", "--recipe", str(world["recipe"]), "--set",
            f"data.tokenizer={tmp_path}/no/such/tok", "--set", f"train.output_dir={tmp_path / 'out'}", "--debug"]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    debug = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith(f"textjepa train: tokenizer directory '{tmp_path}/no/such/tok'")


def test_resume_after_the_model_changed_names_the_keys_and_keeps_the_checkpoint(world, tmp_path, capsys):
    run = copy_of(world["run"], tmp_path)
    checkpoint = run / "checkpoint-00000002"
    files = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    run_recipe = (run / "recipe.yaml").read_bytes()
    capsys.readouterr()
    assert cli_main(train(world, f"train.output_dir={run}", "model.intermediate_size=128",
                          "model.hidden_dropout_prob=0.1", "train.max_steps=3", "train.export=false", resume=True)) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"textjepa train: {checkpoint}: the recipe's model does not fit this checkpoint: model.intermediate_size is "
        "128 in the recipe but 64 in the checkpoint; model.hidden_dropout_prob is 0.1 in the recipe but 0.0 in the "
        "checkpoint; to resume, use the checkpoint's values (--set model.intermediate_size=64 --set "
        "model.hidden_dropout_prob=0.0) or another train.output_dir; the checkpoint is untouched (run with --debug for "
        "the traceback)")
    assert {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == files
    assert ckpt.list_checkpoints(run) == [checkpoint]  # nothing set aside
    assert (run / "recipe.yaml").read_bytes() == run_recipe  # the run's recipe is not replaced by the misfit
    # with the checkpoint's values (the recipe file's), the run resumes
    assert cli_main(train(world, f"train.output_dir={run}", "train.max_steps=3", "train.export=false", resume=True)) == 0
    assert ckpt.latest_checkpoint(run).name == "checkpoint-00000003"


def test_results_that_were_silent_are_reported(world, tmp_path, caplog, capsys):
    from textjepa.data import load_text_dataset

    caplog.set_level(logging.INFO)
    # --resume with no checkpoint (JEPA) says so
    said = []
    recipe = tiny_recipe({"tokenizer": world["tokenizer"], "packed": world["packed"]}, tmp_path / "new",
                         **{"train.max_steps": 1})
    loop.train(recipe, resume=True, announce=said.append)
    assert any(s.startswith(f"--resume: no checkpoint to resume from in {tmp_path / 'new'}") for s in said), said
    # a vocabulary larger than the corpus can fill: both numbers
    assert cli_main(["tokenizer", "train", "--source", str(world["root"] / "corpus.txt"), "--vocab-size", "5000",
                     "--output", str(tmp_path / "tok")]) == 0
    warned = [r.getMessage() for r in caplog.records if "asked for vocab_size=5000" in r.getMessage()]
    assert warned and "yields only" in warned[0]
    # numbers in a jsonl text column become documents: counted and reported
    (tmp_path / "nums.jsonl").write_text('{"text": 12}\n{"text": 3.5}\n{"text": null}\n')
    docs = load_text_dataset([str(tmp_path / "nums.jsonl")])
    assert sorted(docs["text"]) == ["12", "3.5"]
    assert any("2 of 3 'text' values are numbers" in r.getMessage() for r in caplog.records)
