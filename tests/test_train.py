"""The accelerate trainer end to end on tiny configs (CPU, seconds per run): learning, exact resume,
atomic checkpoints, gradient accumulation, guards, MLM baseline, export, 2-process DDP."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from textjepa.training import checkpoint as ckpt
from textjepa.training import loop
from textjepa.training.diagnostics import read_jsonl
from textjepa.training.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]

SUBJECTS = ["the old sailor", "a young whale", "the captain", "my brother", "the quiet town", "a stranger"]
VERBS = ["watched", "followed", "remembered", "carried", "feared", "praised"]
OBJECTS = ["the grey sea", "a broken mast", "the long harbour", "an empty boat", "the winter storm", "a letter"]
ENDINGS = ["before dawn.", "with great care.", "for many years.", "in silence.", "again and again.", "at noon."]


def generated_corpus(n_docs=300, seed=0):
    """Documents of templated sentences: enough structure that a tiny model's loss drops fast."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
                     for _ in range(rng.integers(3, 8))]
        docs.append(" ".join(s.capitalize() for s in sentences))
    return "\n\n".join(docs) + "\n"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A trained tokenizer and packed blocks of 32 tokens saved to disk (built once per module)."""
    import datasets

    from textjepa.data import build_pretraining_datasets
    from textjepa.tokenization import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "corpus.txt"
    corpus.write_text(generated_corpus())
    tokenizer = train_tokenizer([str(corpus)], 150, model="unigram", output_dir=str(root / "tokenizer"))
    train, valid = build_pretraining_datasets([str(corpus)], tokenizer, 32, validation_fraction=0.05, seed=0)
    datasets.DatasetDict(train=train, validation=valid).save_to_disk(str(root / "packed"))
    return {"tokenizer": str(root / "tokenizer"), "packed": str(root / "packed"), "corpus": str(corpus),
            "train_blocks": len(train)}


def tiny_recipe(tiny_data, output_dir, **overrides):
    raw = {
        "model": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      predictor_hidden_size=16, predictor_num_hidden_layers=1, predictor_num_attention_heads=2,
                      target_num_layers=1),
        "data": dict(tokenizer=tiny_data["tokenizer"], packed_path=tiny_data["packed"], block_size=32),
        "mask": dict(num_masks=2, target_ratio=0.25, num_spans=2),
        "optim": dict(lr=3e-3, min_lr=1e-4, warmup_steps=3, weight_decay=0.01),
        "ema": dict(momentum_start=0.99, momentum_end=1.0),
        # one thread: on a busy 2-core box two spinning OpenMP threads make tiny ops ~10x slower
        "train": dict(output_dir=str(output_dir), max_steps=12, batch_size=8, save_every=1000, export=False,
                      threads=1),
        "log": dict(every=1, diag_every=4, probe_size=32, trackers=["jsonl"], plot=False, progress_bar=False),
    }
    items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return parse_recipe(raw, "tiny", items)


def losses(output_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(Path(output_dir) / loop.METRICS_FILE)}


def quiet(*args, **kwargs):
    pass


def teacher_state(checkpoint_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint_dir) / ckpt.TEACHER_FILE))


def test_loss_goes_down_exports_and_logs(tiny_data, tmp_path):
    from transformers import AutoModel

    import textjepa

    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, out, **{"train.max_steps": 60, "optim.lr": 1e-2, "train.export": True,
                                            "log.plot": True, "log.trackers": ["jsonl", "tensorboard"],
                                            "log.every": 2, "train.export_whiten_on": tiny_data["corpus"],
                                            "train.export_whiten_docs": 100, "train.export_token_weights": "sif"})
    summary = loop.train(recipe, announce=quiet)
    records = read_jsonl(out / loop.METRICS_FILE)
    first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
    assert last < 0.75 * first, (first, last)  # ~0.43 -> ~0.26 here
    for key in ("loss", "lr", "momentum", "grad_norm", "tokens_per_s", "target_std", "prediction_std"):
        assert all(np.isfinite(r[key]) for r in records), key
    ranks = [r["effective_rank"] for r in records if "effective_rank" in r]
    assert len(ranks) == 15 and all(2.0 < v <= 32 for v in ranks)
    assert records[0]["momentum"] == pytest.approx(0.99) and 0.99 < records[-1]["momentum"] <= 1.0
    # warmup: optimizer step 0 (logged as step 1) gets lr/3, the peak 1e-2 comes at step 3, then cosine
    by_step = {r["step"]: r for r in records}
    assert by_step[1]["lr"] == pytest.approx(1e-2 / 3) and by_step[4]["lr"] == pytest.approx(1e-2, rel=0.01)
    assert by_step[60]["lr"] < 2e-4
    assert summary["steps"] == 60 and summary["tokens_seen"] == 60 * 8 * 32
    # resolved recipe beside the run and every checkpoint; tensorboard events; curves PNG
    assert (out / "recipe.yaml").is_file() and (out / "checkpoint-00000060" / "recipe.yaml").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "training_curves.png").stat().st_size > 10_000
    # export: AutoModel loads the teacher with no missing/unexpected keys, and it is the teacher
    model, info = AutoModel.from_pretrained(out / "export", output_loading_info=True)
    assert isinstance(model, textjepa.TextJepaModel)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    teacher = teacher_state(out / "checkpoint-00000060")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, teacher[name], rtol=0, atol=0)
    card = (out / "export" / "README.md").read_text()
    assert "15,360 tokens seen" in card and "effective_rank" in card and "objective: jepa" in card
    assert (out / "export" / "tokenizer.json").is_file()
    # whitening fitted on the corpus ships inside the export, and SentenceEncoder applies it
    from textjepa.evaluation import SentenceEncoder

    assert summary["whitening"] == str(out / "export" / "whitening.safetensors")
    shipped = SentenceEncoder(str(out / "export"))
    assert len(shipped.whitening) == 1 and shipped.token_weights.shape == (len(shipped.tokenizer),)
    assert (out / "export" / "2_Dense" / "model.safetensors").is_file()  # SentenceTransformer applies it too


CONCEPTS = {"mask.num_views": 2, "model.span_loss_weight": 1.0, "model.cross_view_loss_weight": 1.0,
            "model.pooled_reg": "sigreg", "model.pooled_reg_weight": 0.1}


DOCUMENT_HALVES = {"mask.views": "document_halves", "model.cross_view_loss_weight": 1.0,
                   "model.bottleneck_loss_weight": 1.0, "model.pooled_reg": "vicreg", "model.pooled_reg_weight": 0.1}


@pytest.mark.parametrize("objective", [{}, CONCEPTS, DOCUMENT_HALVES],
                         ids=["tokens+sentence", "concepts", "document-halves"])
def test_resume_is_exact(tiny_data, tmp_path, objective):
    full = tiny_recipe(tiny_data, tmp_path / "full", **{"train.save_every": 4}, **objective)
    loop.train(full, announce=quiet)
    part = tiny_recipe(tiny_data, tmp_path / "part", **{"train.save_every": 4, "train.stop_after": 6}, **objective)
    summary = loop.train(part, announce=quiet)
    assert summary["steps"] == 6 and "stop_after" in summary["end_reason"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "part")] == ["checkpoint-00000004",
                                                                          "checkpoint-00000006"]
    rest = tiny_recipe(tiny_data, tmp_path / "part", **{"train.save_every": 4}, **objective)
    loop.train(rest, resume=True, announce=quiet)
    full_losses, resumed_losses = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(resumed_losses) == list(range(1, 13))  # the log was continued, not duplicated
    for step in range(1, 13):
        assert resumed_losses[step] == full_losses[step], step  # bit-identical on CPU
    a, b = teacher_state(tmp_path / "full" / "checkpoint-00000012"), teacher_state(tmp_path / "part" / "checkpoint-00000012")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_fresh_start_refuses_existing_checkpoints(tiny_data, tmp_path):
    out = tmp_path / "run"
    loop.train(tiny_recipe(tiny_data, out, **{"train.max_steps": 2}), announce=quiet)
    with pytest.raises(FileExistsError, match="already holds checkpoint-00000002: pass --resume"):
        loop.train(tiny_recipe(tiny_data, out, **{"train.max_steps": 3}), announce=quiet)
    loop.train(tiny_recipe(tiny_data, out, **{"train.max_steps": 3, "train.overwrite": True}), announce=quiet)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-00000003"]
    assert sorted(losses(out)) == [1, 2, 3]


def test_kill_during_save_keeps_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    from textjepa.training.export import load_checkpoint_model

    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, out, **{"train.save_every": 3, "train.max_steps": 6})
    real_write = ckpt.write_trainer_state
    calls = []

    def dies_on_second_save(directory, state):
        calls.append(state.step)
        if len(calls) == 2:
            (directory / "trainer_state.json").write_text('{"step": ')  # torn write, then the "kill"
            raise KeyboardInterrupt("simulated kill during save")
        real_write(directory, state)

    monkeypatch.setattr(ckpt, "write_trainer_state", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        loop.train(recipe, announce=quiet)
    assert calls == [3, 6]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-00000003"]
    assert ckpt.tmp_checkpoint_dir(out, 6).is_dir()  # the torn save is left as .tmp-*, never as checkpoint-*
    _, model, _, state = load_checkpoint_model(out / "checkpoint-00000003")
    assert state.step == 3 and all(torch.isfinite(p).all() for p in model.parameters())

    monkeypatch.setattr(ckpt, "write_trainer_state", real_write)
    summary = loop.train(recipe, resume=True, announce=quiet)
    assert summary["steps"] == 6 and not ckpt.tmp_checkpoint_dir(out, 6).exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-00000003", "checkpoint-00000006"]


def test_grad_accumulation_matches_big_batch_and_ema_once_per_step(tiny_data, tmp_path, monkeypatch):
    from textjepa import TextJepaForPreTraining

    momenta = []
    real_update = TextJepaForPreTraining.update_teacher

    def counting_update(self, momentum):
        momenta.append(momentum)
        return real_update(self, momentum)

    monkeypatch.setattr(TextJepaForPreTraining, "update_teacher", counting_update)
    big = tiny_recipe(tiny_data, tmp_path / "big", **{"train.max_steps": 6, "train.batch_size": 8})
    loop.train(big, announce=quiet)
    assert momenta[0] == 0.0 and len(momenta) == 1 + 6  # initial copy, then once per optimizer step
    momenta.clear()
    accum = tiny_recipe(tiny_data, tmp_path / "accum", **{"train.max_steps": 6, "train.batch_size": 4,
                                                          "train.grad_accum": 2})
    loop.train(accum, announce=quiet)
    assert len(momenta) == 1 + 6, momenta  # not once per micro-batch
    state = json.loads((tmp_path / "accum" / "checkpoint-00000006" / "trainer_state.json").read_text())
    assert state["ema_updates"] == 6 and state["tokens_seen"] == 6 * 8 * 32
    big_losses, accum_losses = losses(tmp_path / "big"), losses(tmp_path / "accum")
    for step in range(1, 7):
        assert accum_losses[step] == pytest.approx(big_losses[step], rel=1e-4, abs=1e-6), step
    a, b = teacher_state(tmp_path / "big" / "checkpoint-00000006"), teacher_state(tmp_path / "accum" / "checkpoint-00000006")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, figure", [({"log.min_std": 50.0}, "target_std"),
                                              ({"log.min_rank": 1e6}, "effective_rank")])
def test_collapse_guard_stops_after_warmup_with_checkpoint(tiny_data, tmp_path, override, figure):
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, out, **{"log.guard_after": 3, "log.diag_every": 2, **override})
    with pytest.raises(loop.TrainingStopped) as err:
        loop.train(recipe, announce=quiet)
    step = 4  # first step after guard_after=3 (rank is measured at step 4 too)
    assert f"step {step}: collapse suspected: {figure}" in str(err.value)
    assert err.value.checkpoint == out / ckpt.checkpoint_name(step)
    assert json.loads((err.value.checkpoint / "trainer_state.json").read_text())["step"] == step


def test_nan_guard(tiny_data, tmp_path):
    from textjepa.data import load_tokenizer
    from textjepa.training.build import build_model

    recipe = tiny_recipe(tiny_data, tmp_path / "run")
    model = build_model(recipe, load_tokenizer(tiny_data["tokenizer"]))
    with torch.no_grad():
        model.predictor.parameters().__next__().fill_(float("nan"))
    with pytest.raises(loop.TrainingStopped, match=r"step 1: loss is nan \(NaN/Inf\)") as err:
        loop.train(recipe, model=model, announce=quiet)
    assert (err.value.checkpoint / "trainer_state.json").is_file()


def test_block_longer_than_positions_fails_before_any_work(tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_data, tmp_path / "run", **{"model.max_position_embeddings": 16})
    with pytest.raises(ValueError, match="block_size=32 is longer than the model's max_position_embeddings=16"):
        loop.train(recipe, announce=quiet)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_mlm_objective_trains_and_exports(tiny_data, tmp_path, caplog):
    from transformers import AutoModel, RobertaModel

    from textjepa.training.export import main as export_main

    out = tmp_path / "mlm"
    recipe = tiny_recipe(tiny_data, out, **{"objective": "mlm", "train.max_steps": 30, "train.export": True,
                                            "optim.lr": 5e-3, "log.every": 2})
    summary = loop.train(recipe, announce=quiet)
    records = read_jsonl(out / loop.METRICS_FILE)
    first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
    assert first > 0.8 * np.log(150) and last < 0.8 * first, (first, last)  # from ~ln(vocab) down
    assert "target_std" not in records[-1] and records[-1]["effective_rank"] > 1.0
    caplog.set_level(logging.WARNING)
    model, info = AutoModel.from_pretrained(out / "export", output_loading_info=True)
    assert type(model) is RobertaModel and model.config.max_position_embeddings == 32 + 2
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not [r for r in caplog.records if "newly initialized" in r.getMessage() or "not used" in r.getMessage()]
    # the export from the checkpoint (CLI) equals the end-of-run export
    assert export_main(["--checkpoint", str(out), "--output", str(tmp_path / "again")]) == 0
    again = AutoModel.from_pretrained(tmp_path / "again")
    for name, tensor in model.state_dict().items():
        if not name.startswith("pooler."):  # the untrained pooler is initialised afresh by each export
            torch.testing.assert_close(tensor, again.state_dict()[name], rtol=0, atol=0)
    assert summary["export"] == str(out / "export")


def test_export_cli_student_and_teacher(tiny_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    import textjepa  # noqa: F401
    from textjepa.training.export import main as export_main

    out = tmp_path / "run"
    loop.train(tiny_recipe(tiny_data, out, **{"train.max_steps": 5}), announce=quiet)
    checkpoint = out / "checkpoint-00000005"
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "s"), "--which", "student"]) == 0
    assert export_main(["--checkpoint", str(out), "--output", str(tmp_path / "t")]) == 0  # run dir -> latest
    student = AutoModel.from_pretrained(tmp_path / "s").state_dict()
    teacher = AutoModel.from_pretrained(tmp_path / "t").state_dict()
    saved_student = load_file(str(checkpoint / "model.safetensors"))
    saved_teacher = teacher_state(checkpoint)
    for name in student:
        torch.testing.assert_close(student[name], saved_student[f"textjepa.{name}"], rtol=0, atol=0)
        torch.testing.assert_close(teacher[name], saved_teacher[name], rtol=0, atol=0)
    assert any(not torch.equal(student[n], teacher[n]) for n in student)  # EMA lags the student
    assert "student of the EMA pair" in (tmp_path / "s" / "README.md").read_text()
    assert export_main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "x")]) == 2


def test_time_budget_ends_session_with_final_diagnostics(tiny_data, tmp_path):
    summary = loop.train(tiny_recipe(tiny_data, tmp_path / "run", **{"train.max_minutes": 0.0}), announce=quiet)
    assert summary["steps"] == 1 and "max_minutes" in summary["end_reason"]
    assert summary["final_metrics"]["step"] == 1 and summary["final_metrics"]["effective_rank"] > 1.0
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "checkpoint-00000001"


def test_bf16_autocast_runs(tiny_data, tmp_path):
    summary = loop.train(tiny_recipe(tiny_data, tmp_path / "bf16", **{"train.mixed_precision": "bf16",
                                                                      "train.max_steps": 4}), announce=quiet)
    records = read_jsonl(tmp_path / "bf16" / loop.METRICS_FILE)
    assert summary["steps"] == 4 and all(np.isfinite(r["loss"]) for r in records)
    # the teacher stays fp32 under autocast
    assert all(v.dtype == torch.float32 for v in teacher_state(tmp_path / "bf16" / "checkpoint-00000004").values())


def test_precision_comes_from_the_launcher_unless_the_recipe_sets_it(tiny_data, tmp_path, monkeypatch):
    """train.mixed_precision null takes `accelerate launch`'s (ACCELERATE_MIXED_PRECISION); a recipe
    value wins and says so in one line; without a launcher null is fp32."""
    said = []
    plain = loop.train(tiny_recipe(tiny_data, tmp_path / "plain", **{"train.max_steps": 1}), announce=said.append)
    assert plain["mixed_precision"] == "no" and "precision no)" in said[0]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    said = []
    launched = loop.train(tiny_recipe(tiny_data, tmp_path / "launched", **{"train.max_steps": 2}), announce=said.append)
    assert launched["mixed_precision"] == "bf16" and any("precision bf16)" in line for line in said)
    assert not any("overrides" in line for line in said)
    assert np.isfinite(launched["final_metrics"]["loss"])
    said = []
    pinned = loop.train(tiny_recipe(tiny_data, tmp_path / "pinned", **{"train.max_steps": 1,
                                                                         "train.mixed_precision": "no"}),
                        announce=said.append)
    assert pinned["mixed_precision"] == "no"
    assert said[0] == ("train.mixed_precision=no overrides the launcher's mixed_precision=bf16 (the recipe wins; "
                       "set it to null to use the launcher's)")


def test_auto_precision_is_bf16_only_where_the_hardware_runs_it(tiny_data, tmp_path, monkeypatch):
    """train.mixed_precision auto: the launcher's when there is one (no override line); without one bf16
    (with the eager attention kernel on the CPU) where loop.native_bf16 says the hardware has it, fp32
    ("no") elsewhere."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(loop, "native_bf16", lambda cpu: False)
    assert loop.resolve_precision("auto", cpu=True) == "no"
    assert loop.resolve_precision(None, cpu=True) is None and loop.resolve_precision("fp16", cpu=True) == "fp16"
    monkeypatch.setattr(loop, "native_bf16", lambda cpu: True)
    assert loop.resolve_precision("auto", cpu=True) == "bf16"
    said = []
    summary = loop.train(tiny_recipe(tiny_data, tmp_path / "auto", **{"train.max_steps": 1,
                                                                      "train.mixed_precision": "auto"}),
                         announce=said.append)
    assert summary["mixed_precision"] == "bf16" and any("with eager attention" in line for line in said)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    said = []
    launched = loop.train(tiny_recipe(tiny_data, tmp_path / "launched", **{"train.max_steps": 1,
                                                                           "train.mixed_precision": "auto"}),
                          announce=said.append)
    assert launched["mixed_precision"] == "no" and not any("overrides" in line for line in said)


def test_auto_precision_is_measured_and_a_resume_keeps_what_the_run_trained_in(tiny_data, tmp_path, monkeypatch):
    """On a CPU, auto measures bf16 against fp32 (not a CPU flag); the checkpoint records the precision the run
    trained in and an auto resume takes it from there, whatever a new measurement says (resume stays exact)."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    speedup = loop.cpu_bf16_speedup()
    assert speedup > 0 and loop.native_bf16(cpu=True) == (speedup >= loop.BF16_MIN_SPEEDUP)
    monkeypatch.setattr(loop, "cpu_bf16_speedup", lambda: 2.0)
    assert loop.resolve_precision("auto", cpu=True) == "bf16"
    monkeypatch.setattr(loop, "cpu_bf16_speedup", lambda: 1.0)
    assert loop.resolve_precision("auto", cpu=True) == "no"
    assert loop.resolve_precision("auto", cpu=True, resumed_from="bf16") == "bf16"

    monkeypatch.setattr(loop, "cpu_bf16_speedup", lambda: 2.0)  # the first session measures bf16 faster
    settings = {"train.max_steps": 2, "train.save_every": 2, "train.mixed_precision": "auto"}
    first = loop.train(tiny_recipe(tiny_data, tmp_path / "run", **settings), announce=quiet)
    assert first["mixed_precision"] == "bf16"
    assert ckpt.read_trainer_state(tmp_path / "run" / "checkpoint-00000002").mixed_precision == "bf16"
    monkeypatch.setattr(loop, "cpu_bf16_speedup", lambda: 1.0)  # the resumed one would measure fp32
    resumed = loop.train(tiny_recipe(tiny_data, tmp_path / "run", **{**settings, "train.max_steps": 3}),
                         resume=True, announce=quiet)
    assert resumed["mixed_precision"] == "bf16" and resumed["steps"] == 3
    fresh = loop.train(tiny_recipe(tiny_data, tmp_path / "fresh", **settings), announce=quiet)
    assert fresh["mixed_precision"] == "no"


def test_cli_reports_bad_recipe(tmp_path, capsys):
    from textjepa.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: abc\n")
    assert main(["--recipe", str(bad)]) == 2
    assert f"{bad}: optim.lr: expected float, got 'abc'" in capsys.readouterr().err
    assert main(["--recipe", "quickstart", "--set", "train.max_steps=3", "--print-recipe"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out


DDP_SCRIPT = """
import os, sys, torch
from safetensors.torch import save_file
from textjepa.data import load_tokenizer
from textjepa.training.build import build_model
from textjepa.training.loop import train
from textjepa.training.recipe import load_recipe

recipe = load_recipe(sys.argv[1], sys.argv[2:])
torch.manual_seed(recipe.train.seed)  # same init in both runs (train() seeds only the models it builds)
model = build_model(recipe, load_tokenizer(recipe.data.tokenizer))
train(recipe, model=model, announce=lambda *a: None)
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # group is gone by now
teacher = {k: v.contiguous() for k, v in model.teacher_state_dict().items()}
save_file(teacher, f"{recipe.train.output_dir}/teacher_rank{rank}_of{world}.safetensors")
queue = {k: v.contiguous() for k, v in model.named_buffers() if k.startswith("pooled_")}  # queue, budget scale
if queue:
    save_file(queue, f"{recipe.train.output_dir}/pooled_rank{rank}_of{world}.safetensors")
"""


def run_two_processes(tiny_data, tmp_path, output_dir, **overrides):
    """DDP_SCRIPT under torch.distributed.run, 2 CPU processes (gloo), on tiny_recipe with these overrides."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    recipe = tiny_recipe(tiny_data, tmp_path / "unused", **overrides)
    recipe.save(tmp_path / "tiny.yaml")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(tmp_path / "tiny.yaml"), f"train.output_dir={output_dir}", "train.batch_size=4"]
    result = subprocess.run(two, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_data, tmp_path):
    from safetensors.torch import load_file

    run_two_processes(tiny_data, tmp_path, tmp_path / "ddp", **{"train.max_steps": 6})
    # the reference: one process (this one), same global batch of 8, same init
    from textjepa.data import load_tokenizer
    from textjepa.training.build import build_model

    single_recipe = tiny_recipe(tiny_data, tmp_path / "single", **{"train.max_steps": 6, "train.batch_size": 8})
    torch.manual_seed(single_recipe.train.seed)
    model = build_model(single_recipe, load_tokenizer(tiny_data["tokenizer"]))
    loop.train(single_recipe, model=model, announce=quiet)
    single = model.teacher_state_dict()
    rank0 = load_file(str(tmp_path / "ddp" / "teacher_rank0_of2.safetensors"))
    rank1 = load_file(str(tmp_path / "ddp" / "teacher_rank1_of2.safetensors"))
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # identical on both ranks
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5)
    ddp_losses, single_losses = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert sorted(ddp_losses) == list(range(1, 7))
    ddp_lrs = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "ddp" / loop.METRICS_FILE)}
    single_lrs = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "single" / loop.METRICS_FILE)}
    for step in range(1, 7):
        assert ddp_losses[step] == pytest.approx(single_losses[step], rel=1e-4), step
        assert ddp_lrs[step] == single_lrs[step]  # the schedule advances once per step, not per process
    state = json.loads((tmp_path / "ddp" / "checkpoint-00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["tokens_seen"] == 6 * 8 * 32


QUEUED_RUN = {"train.max_steps": 4, "ema.schedule": "frozen", "mask.views": "documents", "mask.num_masks": 1,
              "model.token_loss_weight": 0.0, "model.sentence_loss_weight": 1.0, "model.pooled_reg": "uniformity",
              "model.pooled_reg_weight": 0.1, "model.pooled_reg_bank": 4096, "model.pooled_reg_drift_budget": 0.01,
              "model.pooled_reg_skip_same_document": True}


@pytest.mark.slow
def test_two_processes_share_one_queue_and_one_budget_scale(tiny_data, tmp_path):
    """Under DDP every process's teacher vectors join the queue (MoCo's all_gather) and the drift budget follows
    the processes' mean sentence loss: both ranks end with the same buffers, and the queue holds what one
    process queues from the same global batches (a frozen teacher embeds a document alike in both runs)."""
    from safetensors.torch import load_file

    from textjepa.data import load_tokenizer
    from textjepa.training.build import build_model

    run_two_processes(tiny_data, tmp_path, tmp_path / "ddp", **QUEUED_RUN)
    ranks = [load_file(str(tmp_path / "ddp" / f"pooled_rank{rank}_of2.safetensors")) for rank in (0, 1)]
    assert set(ranks[0]) == {"pooled_bank", "pooled_bank_seen", "pooled_bank_documents", "pooled_reg_scale"}
    for name in ranks[0]:
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # one queue, one scale
    assert float(ranks[0]["pooled_reg_scale"]) < 1.0  # the budget acted

    single_recipe = tiny_recipe(tiny_data, tmp_path / "single", **{**QUEUED_RUN, "train.batch_size": 8})
    torch.manual_seed(single_recipe.train.seed)
    model = build_model(single_recipe, load_tokenizer(tiny_data["tokenizer"]))
    loop.train(single_recipe, model=model, announce=quiet)
    seen = int(model.pooled_bank_seen)
    assert 0 < seen < len(model.pooled_bank) and int(ranks[0]["pooled_bank_seen"]) == seen
    ddp_queue, single_queue = ranks[0]["pooled_bank"][:seen], model.pooled_bank[:seen]
    # (seen, seen), exact differences (the matmul form errs by ~1e-3 near 0): every queued vector has its twin
    distances = torch.cdist(ddp_queue, single_queue, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(dim=1).values.max() < 1e-4 and distances.min(dim=0).values.max() < 1e-4
    assert sorted(ranks[0]["pooled_bank_documents"][:seen].tolist()) == sorted(
        model.pooled_bank_documents[:seen].tolist())


def test_tf32_only_on_cuda_and_restored():
    import contextlib

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with contextlib.ExitStack() as cleanup:
        loop._allow_tf32(torch.device("cpu"), cleanup)  # the CPU: nothing changes
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with contextlib.ExitStack() as cleanup:  # the flags alone (no GPU needed to set them)
        loop._allow_tf32(torch.device("cuda"), cleanup)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize("objective", ["jepa", "mlm"])
def test_micro_batches_do_not_depend_on_loader_workers(objective):
    """data.num_workers (recipes/base.yaml uses 4) must not change any micro-batch: each block's mask
    comes from its own seed, also for the first block a worker builds."""
    import datasets

    from textjepa.data import load_tokenizer
    from textjepa.training.batches import (SHIPPED_TOKENIZER, JepaBatchMaker, MicroBatches, MlmBatchMaker,
                                           TrainingData, masking_config, micro_batch_loader)

    recipe = parse_recipe({"objective": objective, "train": {"max_steps": 6, "batch_size": 4},
                           "mask": {"num_views": 2}})
    tokenizer = load_tokenizer(SHIPPED_TOKENIZER)
    ids = np.random.default_rng(0).integers(5, len(tokenizer), (64, 64))
    blocks = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("numpy")
    make = (JepaBatchMaker(masking_config(recipe, tokenizer)) if objective == "jepa"
            else MlmBatchMaker(tokenizer, recipe.mask.mlm_probability))
    data = TrainingData(tokenizer, MicroBatches(blocks, 4, 1, 0, 1, 0, make), None, 64, 256)
    loaded = {}
    for workers in (2, 0):  # the worker run first: forked workers must not inherit a used collator state
        recipe.data.num_workers = workers
        loaded[workers] = list(micro_batch_loader(data, recipe, ckpt.TrainerState(step=2), torch.device("cpu")))
    assert len(loaded[0]) == len(loaded[2]) == 4
    for with_workers, without in zip(loaded[2], loaded[0]):
        assert with_workers.keys() == without.keys()
        assert all(torch.equal(with_workers[k], without[k]) for k in without)
