"""Recipes (typed parsing, named errors, overrides), schedules, checkpoint bookkeeping, RankMe."""

import dataclasses
import math
import typing
from typing import Optional

import pytest
import torch

from textjepa import TextJepaConfig
from textjepa.masking import MaskingConfig
from textjepa.objectives import LOSS_TERMS
from textjepa.training import checkpoint as ckpt
from textjepa.training import schedules
from textjepa.training.diagnostics import check_guards, effective_rank
from textjepa.training.recipe import (
    EMA_PREFIX,
    EmaSection,
    MaskSection,
    ModelSection,
    Recipe,
    RecipeError,
    load_recipe,
)


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_typed_sections(tmp_path):
    recipe = load_recipe(write(tmp_path, "optim:\n  lr: 1e-3\ntrain:\n  max_steps: 50\n  batch_size: 4\n"))
    assert isinstance(recipe, Recipe)
    assert recipe.optim.lr == 1e-3 and isinstance(recipe.optim.lr, float)  # PyYAML reads 1e-3 as a string
    assert recipe.train.max_steps == 50 and recipe.objective == "jepa"
    assert recipe.ema.momentum_start == 0.996 and recipe.ema.momentum_end == 1.0


@pytest.mark.parametrize("section, config, prefix, recipe_only", [
    (ModelSection, TextJepaConfig, "", {"attn_implementation", "init_from"}),
    (MaskSection, MaskingConfig, "", {"special_tokens_never_target", "mlm_probability"}),
    (EmaSection, TextJepaConfig, EMA_PREFIX, set()),
])
def test_config_sections_mirror_their_configs(section, config, prefix, recipe_only):
    """model.*, mask.* and ema.* keys are written out in recipe.py and are fields of their config: each has
    the config's type and default, or is Optional with default null (= the config's own default)."""
    config_fields = config.__dataclass_fields__
    hints = typing.get_type_hints(section)
    for key in dataclasses.fields(section):
        if key.name in recipe_only:
            continue
        spec = config_fields[prefix + key.name]  # KeyError: a recipe key that its config does not have
        if key.default is None:
            assert hints[key.name] == Optional[spec.type], key.name
        else:
            assert (hints[key.name], key.default) == (spec.type, spec.default), key.name


def test_every_field_that_shapes_a_loss_term_is_a_recipe_key():
    """What LOSS_TERMS says shapes a term (and each term's weight) can be set with --set model.KEY."""
    keys = {key.name for key in dataclasses.fields(ModelSection)}
    shaping = {f"{term.name}_weight" for term in LOSS_TERMS} | {name for term in LOSS_TERMS for name in term.shaped_by}
    assert shaping - keys == set()  # e.g. a new config field added to LOSS_TERMS but not to ModelSection


@pytest.mark.parametrize("text, expected", [
    ("optim:\n  lr: abc\n", "recipe.yaml: optim.lr: expected float, got 'abc'"),
    ("optim:\n  lrr: 0.1\n", "recipe.yaml: optim: unknown key 'lrr' (did you mean 'lr'?)"),
    ("optimizer:\n  lr: 0.1\n", "recipe.yaml: unknown key 'optimizer' (did you mean 'optim'?)"),
    ("train:\n  max_steps: 10.5\n", "train.max_steps: expected int, got 10.5"),
    ("train:\n  max_steps: true\n", "train.max_steps: expected int, got True"),
    ("objective: bert\n", "objective: expected one of 'jepa', 'mlm', got 'bert'"),
    ("ema:\n  schedule: step\n", "ema.schedule: expected one of"),
    ("optim:\n  betas: [0.9, x]\n", "optim.betas[1]: expected float, got 'x'"),
    ("model: 3\n", "model: expected a mapping"),
    ("model:\n  hidden_size: 100\n  num_attention_heads: 3\n", "model.hidden_size: 100 is not divisible"),
    ("mask:\n  target_ratio: 1.5\n", "mask.target_ratio: expected a number in (0, 1)"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("optim: [\n", "not valid YAML"),
    ("data:\n  weights: [1, 2]\n", "data.weights: expected mapping of str to float or null, got [1, 2]"),
    ("data:\n  weights: {sotu: x}\n", "data.weights.sotu: expected float, got 'x'"),
    ("data:\n  weights: {sotu: -1}\n", "data.weights.sotu: expected a number >= 0, got -1.0"),
    ("data:\n  weights: {sotu: .inf}\n", "data.weights.sotu: expected a number >= 0, got inf"),
    ("data:\n  weights: {sotu: 2}\n  packed_path: blocks\n", "data.weights: cannot reweight data.packed_path"),
    ("data:\n  weights: {sotu: 2}\n  streaming: true\n", "data.weights: not supported with data.streaming yet"),
])
def test_bad_recipes_name_the_key(tmp_path, text, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text))
    assert expected in str(err.value)
    assert "recipe.yaml" in str(err.value)


def test_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.001\n")
    recipe = load_recipe(path, ["optim.lr=3e-4", "train.max_steps=7", "optim.betas=[0.8, 0.9]",
                                "data.source=[a.txt, b.txt]", "objective=mlm", "data.tokenizer=null",
                                "train.stop_after=3"])
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.train.max_steps == 7 and recipe.optim.betas == [0.8, 0.9]
    assert recipe.data.source == ["a.txt", "b.txt"] and recipe.objective == "mlm"
    assert recipe.data.tokenizer is None and recipe.train.stop_after == 3
    with pytest.raises(RecipeError, match=r"optim.lr: expected float, got 'abc'"):
        load_recipe(path, ["optim.lr=abc"])
    with pytest.raises(RecipeError, match=r"unknown key 'nope'"):
        load_recipe(path, ["train.nope=1"])
    with pytest.raises(RecipeError, match=r"expected KEY=VALUE"):
        load_recipe(path, ["optim.lr"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "objective: mlm\nmodel:\n  hidden_size: 64\n"), ["optim.lr=2e-4"])
    recipe.save(tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again == recipe


@pytest.mark.parametrize("name", ["quickstart", "small", "base"])
def test_shipped_recipes_parse(name):
    recipe = load_recipe(f"recipes/{name}.yaml")
    assert recipe.train.max_steps > recipe.optim.warmup_steps
    assert load_recipe(name) == recipe  # bare names resolve to the repository's recipes/


def test_base_recipe_builds_a_base_size_model():
    """recipes/base.yaml (for one GPU) parses and builds on the CPU: the encoder is BERT-base sized, the
    predictor has the small recipe's width and depth ratios. (No step is run at this size on the CPU.)"""
    from textjepa.training.build import build_model, build_optimizer

    recipe = load_recipe("recipes/base.yaml")
    small = load_recipe("recipes/small.yaml")
    m = recipe.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == (768, 12, 12, 3072)
    assert m.predictor_hidden_size / m.hidden_size == small.model.predictor_hidden_size / small.model.hidden_size
    assert (m.predictor_num_hidden_layers / m.num_hidden_layers
            == small.model.predictor_num_hidden_layers / small.model.num_hidden_layers)
    assert recipe.data.block_size == 512 and recipe.data.vocab_size == 32000 and m.attn_implementation == "sdpa"
    assert recipe.train.mixed_precision == "bf16"

    class Tokenizer:  # what build_model reads of a tokenizer: its length and special ids
        pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

        def __len__(self):
            return recipe.data.vocab_size

    model = build_model(recipe, Tokenizer())
    config = model.config
    assert config.vocab_size == 32000 and config.max_position_embeddings == 512
    assert config._attn_implementation == "sdpa" and config.predictor_intermediate_size == 4 * 384
    trainable = sum(p.numel() for p in model.parameters())
    assert 120e6 < trainable < 130e6  # encoder ~110 M (24.6 M of them embeddings) + predictor and heads
    optimizer = build_optimizer(model, recipe, torch.device("cpu"))
    assert len(optimizer.param_groups) == 2
    first_lr = schedules.learning_rate(0, recipe.train.max_steps, recipe.optim.warmup_steps, recipe.optim.lr,
                                       recipe.optim.min_lr)
    assert [group["lr"] for group in optimizer.param_groups] == [first_lr] * 2  # the schedule's, one source


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("no/such/recipe.yaml")


def test_lr_schedule_warmup_then_cosine():
    lrs = [schedules.learning_rate(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup increases
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decreases
    assert schedules.learning_rate(55, 100, 10, 1e-3, 1e-5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert schedules.learning_rate(100, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5)


def test_weight_decay_schedule():
    assert schedules.weight_decay(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert schedules.weight_decay(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert schedules.weight_decay(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert schedules.weight_decay(70, 100, 0.04, None) == 0.04


def test_ema_momentum_schedules():  # moved from test_modeling.py with the schedule (issue 14)
    for schedule, middle in (("cosine", 0.998), ("linear", 0.998), ("constant", 0.996)):
        def momentum(step, total):
            return schedules.ema_momentum(step, total, 0.996, 1.0, schedule)
        assert momentum(0, 100) == pytest.approx(0.996)
        assert momentum(50, 100) == pytest.approx(middle)
        assert momentum(100, 100) == pytest.approx(1.0 if schedule != "constant" else 0.996)
    assert schedules.ema_momentum(25, 100, 0.996, 1.0, "cosine") < 0.998  # cosine moves slowly at first


def test_effective_rank():
    torch.manual_seed(0)
    full = torch.randn(512, 32)
    collapsed = torch.randn(512, 1) @ torch.randn(1, 32) + 1e-6 * torch.randn(512, 32)
    assert 28 < effective_rank(full) <= 32
    assert effective_rank(collapsed) < 1.1
    two = torch.cat([torch.randn(512, 2), torch.zeros(512, 30)], dim=1)
    assert 1.7 < effective_rank(two) <= 2.001  # + eps per singular value
    assert math.isnan(effective_rank(torch.full((4, 4), float("nan"))))


def test_guards():
    assert check_guards(3, {"loss": float("nan")}, guard_active=False, min_std=0.1, min_rank=2) == \
        "step 3: loss is nan (NaN/Inf); stopping"
    assert check_guards(3, {"loss": 1.0, "target_std": 0.01}, guard_active=False, min_std=0.1, min_rank=2) is None
    reason = check_guards(9, {"loss": 1.0, "target_std": 0.01}, guard_active=True, min_std=0.1, min_rank=2)
    assert reason.startswith("step 9: collapse suspected: target_std = 0.01")
    reason = check_guards(9, {"loss": 1.0, "effective_rank": 1.2}, guard_active=True, min_std=0.1, min_rank=2)
    assert "effective_rank = 1.2" in reason and "log.min_rank" in reason


def test_checkpoint_listing_prune_and_commit(tmp_path):
    for step in (5, 10, 20):
        tmp = ckpt.tmp_checkpoint_dir(tmp_path, step)
        tmp.mkdir()
        (tmp / "payload.bin").write_bytes(b"x" * step)
        with pytest.raises(RuntimeError, match="without trainer_state.json"):
            ckpt.commit_checkpoint(tmp, tmp_path / ckpt.checkpoint_name(step))
        (tmp / ckpt.COMPLETE_MARKER).write_text("{}")
        ckpt.commit_checkpoint(tmp, tmp_path / ckpt.checkpoint_name(step))
    half_written = ckpt.tmp_checkpoint_dir(tmp_path, 30)
    half_written.mkdir()
    (tmp_path / "checkpoint-00000040").mkdir()  # no trainer_state.json: incomplete, ignored
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint-00000005", "checkpoint-00000010", "checkpoint-00000020"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-00000020"
    assert [p.name for p in ckpt.prune_checkpoints(tmp_path, 2)] == ["checkpoint-00000005"]
    assert ckpt.remove_stale_tmp(tmp_path) == [half_written] and not half_written.exists()
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_unquoted_no_in_yaml_is_the_string_no(tmp_path):
    """PyYAML reads `mixed_precision: no` (and `--set train.mixed_precision=no`) as False: a choice
    that includes "no" takes it as "no"."""
    recipe = load_recipe(write(tmp_path, "train:\n  mixed_precision: no\n"), overrides=["train.export=no"])
    assert recipe.train.mixed_precision == "no" and recipe.train.export is False
    assert load_recipe(write(tmp_path, "train: {}\n"), overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
