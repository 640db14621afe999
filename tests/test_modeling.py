"""Model core: shapes, save/load, SDPA == eager, visible-only forward, teacher EMA, loss, strict loading."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config_kwargs
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification

import textjepa
from textjepa import (
    TextJepaConfig,
    TextJepaForPreTraining,
    TextJepaForSequenceClassification,
    TextJepaModel,
    pool_hidden_states,
)

POSITION_SCHEMES = ["absolute", "rotary"]


def make_config(**overrides):
    return TextJepaConfig(**tiny_config_kwargs(**overrides))


def random_ids(batch=3, length=24, vocab=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def random_masks(batch, num_masks, length, num_context, num_target, seed=0):
    """Disjoint sorted context/target index sets per (sequence, mask): (B, K, Nc), (B, K, Nt)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(length, generator=generator) for _ in range(batch * num_masks)])
    target = order[:, :num_target].sort(dim=1).values.view(batch, num_masks, num_target)
    context = order[:, num_target : num_target + num_context].sort(dim=1).values.view(batch, num_masks, num_context)
    return context, target


# -- configuration -----------------------------------------------------------------------------


def test_config_rejects_unknown_and_invalid_keys():
    with pytest.raises(ValueError, match="hiden_size"):
        TextJepaConfig(hiden_size=64)
    with pytest.raises(Exception, match="num_attention_heads"):
        TextJepaConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(Exception, match="target_num_layers"):
        TextJepaConfig(num_hidden_layers=2, target_num_layers=3)
    with pytest.raises(Exception, match="position_embedding_type"):
        TextJepaConfig(position_embedding_type="alibi")


def test_config_round_trip(tmp_path):
    config = make_config(position_embedding_type="rotary", target_norm="instance_norm", loss_type="mse")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TextJepaConfig)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}
    assert loaded.predictor_intermediate_size == 4 * loaded.predictor_hidden_size


# -- encoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITION_SCHEMES)
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_encoder_shapes(position, norm):
    config = make_config(position_embedding_type=position, norm_placement=norm)
    model = TextJepaModel(config).eval()
    ids = random_ids()
    out = model(ids, output_hidden_states=True)
    assert list(out.keys())[0] == "last_hidden_state"
    assert out.last_hidden_state.shape == (3, 24, 32)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


@pytest.mark.parametrize("position", POSITION_SCHEMES)
def test_sdpa_matches_eager_with_padding(position):
    config = make_config(position_embedding_type=position)
    sdpa = TextJepaModel(config).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = TextJepaModel(make_config(position_embedding_type=position, attn_implementation="eager")).eval()
    assert eager.config._attn_implementation == "eager"
    eager.load_state_dict(sdpa.state_dict())
    ids = random_ids()
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 17:] = 0  # padding at the end of one row
    for mask in (None, attention_mask):
        expected = eager(ids, attention_mask=mask).last_hidden_state
        actual = sdpa(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITION_SCHEMES)
def test_visible_only_forward_equals_masked_full_sequence(position):
    """The student reads a gathered subset with the original positions. That must equal reading the
    full sequence in which every other token is hidden from attention."""
    # a larger init than the default so attention is far from uniform and positions visibly matter
    model = TextJepaModel(make_config(position_embedding_type=position, initializer_range=0.3)).eval()
    ids = random_ids(batch=2, length=20)
    visible = torch.tensor([[0, 2, 3, 7, 8, 12, 19], [1, 4, 5, 6, 10, 15, 18]])
    gathered = model(ids.gather(1, visible), position_ids=visible).last_hidden_state  # (2, 7, H)

    only_visible = torch.zeros_like(ids).scatter_(1, visible, 1)  # attention mask: visible tokens only
    full = model(ids, attention_mask=only_visible).last_hidden_state
    expected = full.gather(1, visible[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(gathered, expected, atol=1e-5, rtol=1e-5)
    # and positions matter: the same tokens at positions 0..6 give different states
    assert not torch.allclose(gathered, model(ids.gather(1, visible)).last_hidden_state, atol=1e-3)


def test_pool_hidden_states_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool_hidden_states(hidden, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pool_hidden_states(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden_states(hidden, mask, "max")


# -- save / load -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export_round_trip_through_automodel_is_bit_identical(tmp_path, which, caplog):
    model = TextJepaForPreTraining(make_config())
    ids = random_ids()
    context, target = random_masks(3, 1, 24, 16, 8)
    # make teacher and student differ, so the test can tell which one was exported
    model(ids, context, target).loss.backward()
    with torch.no_grad():
        for p in model.textjepa.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.update_teacher(0.5)
    model.export_encoder(tmp_path, which=which)
    assert os.path.exists(tmp_path / "model.safetensors")
    assert not any(name.endswith(".bin") for name in os.listdir(tmp_path))
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, TextJepaModel)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    source = model.teacher if which == "teacher" else model.textjepa.eval()
    assert torch.equal(loaded.eval()(ids).last_hidden_state, source(ids).last_hidden_state)
    other = model.textjepa if which == "teacher" else model.teacher
    assert not torch.equal(loaded(ids).last_hidden_state, other(ids).last_hidden_state)
    assert json.load(open(tmp_path / "config.json"))["architectures"] == ["TextJepaModel"]
    assert model.config.architectures != ["TextJepaModel"] or which == "teacher"  # export left our config alone


def test_sequence_classification_from_encoder_export(tmp_path):
    model = TextJepaForPreTraining(make_config())
    model.export_encoder(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert isinstance(classifier, TextJepaForSequenceClassification)
    torch.testing.assert_close(
        classifier.textjepa.embeddings.word_embeddings.weight, model.teacher.embeddings.word_embeddings.weight
    )
    ids = random_ids()
    out = classifier(ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss > 0
    out.loss.backward()
    # regression head when num_labels == 1
    regressor = TextJepaForSequenceClassification(make_config(num_labels=1, classifier_pooling="cls"))
    out = regressor(ids, labels=torch.tensor([0.5, 1.0, 4.0]))
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, 1.0, 4.0])))


def test_pretraining_model_save_and_auto_load(tmp_path):
    model = TextJepaForPreTraining(make_config())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert isinstance(loaded, TextJepaForPreTraining)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    assert not any(key.startswith("_teacher") or "teacher" in key for key in loaded.state_dict())
    # the teacher is born from the loaded student, not from random init
    assert torch.equal(loaded.teacher.embeddings.word_embeddings.weight, model.textjepa.embeddings.word_embeddings.weight)


def test_mismatched_checkpoint_raises(tmp_path):
    TextJepaModel(make_config(num_hidden_layers=3)).save_pretrained(tmp_path / "deep")
    config = json.load(open(tmp_path / "deep" / "config.json"))
    config["num_hidden_layers"] = 2  # model has fewer layers than the weights: unexpected keys
    json.dump(config, open(tmp_path / "deep" / "config.json", "w"))
    with pytest.raises(ValueError, match="unexpected encoder weights"):
        AutoModel.from_pretrained(tmp_path / "deep")
    config["num_hidden_layers"] = 4  # more layers than the weights: missing keys
    json.dump(config, open(tmp_path / "deep" / "config.json", "w"))
    with pytest.raises(ValueError, match="missing encoder weights"):
        AutoModel.from_pretrained(tmp_path / "deep")
    config["num_hidden_layers"] = 3
    config["intermediate_size"] = 48  # shape mismatch
    json.dump(config, open(tmp_path / "deep" / "config.json", "w"))
    with pytest.raises(Exception, match="mismatched"):  # transformers itself refuses mismatched shapes
        AutoModel.from_pretrained(tmp_path / "deep")


def test_trust_remote_code_without_textjepa(tmp_path):
    model = TextJepaForPreTraining(make_config())
    model.export_encoder(tmp_path / "export", auto_map=True)
    ids = random_ids()
    torch.save(ids, tmp_path / "ids.pt")
    expected = model.teacher(ids).last_hidden_state
    torch.save(expected, tmp_path / "expected.pt")
    # a fresh interpreter that never imports textjepa: transformers must load the copied code
    script = f"""
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / 'export')!r}, trust_remote_code=True).eval()
assert 'textjepa' not in sys.modules, 'textjepa was imported'
out = model(torch.load({str(tmp_path / 'ids.pt')!r})).last_hidden_state
assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r})), 'outputs differ'
print(type(model).__module__)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transformers_modules" in result.stdout


# -- pretraining -------------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITION_SCHEMES)
@pytest.mark.parametrize("target_norm", ["layer_norm", "instance_norm", "none"])
def test_pretraining_shapes_and_diagnostics(position, target_norm):
    model = TextJepaForPreTraining(make_config(position_embedding_type=position, target_norm=target_norm))
    ids = random_ids(batch=2, length=24)
    context, target = random_masks(2, 3, 24, num_context=14, num_target=7)
    out = model(ids, context, target)
    assert out.predictions.shape == out.targets.shape == (6, 7, 32)
    assert out.loss.ndim == 0 and out.loss > 0
    assert out.target_std > 0 and out.prediction_std > 0
    # targets are the teacher's normalised states at the target positions
    full = model.compute_targets(ids)
    torch.testing.assert_close(out.targets[4], full[1, target[1, 1]])


def test_teacher_reads_each_sequence_once_for_k_masks():
    model = TextJepaForPreTraining(make_config())
    calls = []
    model.teacher.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    ids = random_ids(batch=2, length=24)
    context, target = random_masks(2, 4, 24, 14, 7)
    model(ids, context, target)
    assert calls == [torch.Size([2, 24])]


def test_teacher_has_no_gradient_and_is_not_a_parameter():
    model = TextJepaForPreTraining(make_config())
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert teacher_ids.isdisjoint(id(p) for p in model.parameters())
    assert not any(key.startswith("teacher") for key in model.state_dict())
    ids = random_ids()
    context, target = random_masks(3, 1, 24, 16, 8)
    model.train()
    assert not model.teacher.training
    model(ids, context, target).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())


def test_teacher_update_math():
    model = TextJepaForPreTraining(make_config())
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.textjepa.parameters():
            p.add_(torch.randn_like(p))
    student = [p.detach().clone() for p in model.textjepa.parameters()]

    model.update_teacher(1.0)  # momentum 1 freezes
    assert all(torch.equal(t, b) for t, b in zip(model.teacher.parameters(), teacher_before))
    model.update_teacher(0.75)
    for t, b, s in zip(model.teacher.parameters(), teacher_before, student):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
    model.update_teacher(0.0)  # momentum 0 copies
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.parameters(), student))


def test_teacher_state_dict_round_trip():
    model = TextJepaForPreTraining(make_config())
    model.update_teacher(0.0)
    state = {k: v.clone() + 1 for k, v in model.teacher_state_dict().items()}
    other = TextJepaForPreTraining(make_config())
    other.load_teacher_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.teacher_state_dict().values(), state.values()))


@pytest.mark.parametrize("loss_type", ["smooth_l1", "mse"])
def test_loss_is_zero_iff_predictions_equal_targets(loss_type):
    model = TextJepaForPreTraining(make_config(loss_type=loss_type, sentence_loss_weight=0.0))  # token loss only
    targets = torch.randn(4, 5, 32)
    assert model.compute_loss(targets.clone(), targets).item() == 0.0
    assert model.compute_loss(targets + 0.1, targets).item() > 0.0
    # the full forward reaches zero too when the predictor outputs the teacher's targets
    ids = random_ids()
    context, target = random_masks(3, 2, 24, 16, 8)
    original = model.predictor.forward
    model.predictor.forward = lambda states, ctx, tgt, mask=None: model.compute_targets(ids)[
        torch.arange(3).repeat_interleave(2)[:, None], tgt
    ]
    assert model(ids, context, target).loss.item() == 0.0
    model.predictor.forward = original
    assert model(ids, context, target).loss.item() > 0.0


def test_variance_regulariser_penalises_collapsed_predictions():
    model = TextJepaForPreTraining(make_config(variance_reg_weight=1.0))
    collapsed = torch.zeros(4, 5, 32)
    spread = torch.randn(4, 5, 32) * 3
    base = TextJepaForPreTraining(make_config())
    assert model.compute_loss(collapsed, collapsed).item() > 0.9  # hinge ~ 1 - 0.01
    assert model.compute_loss(spread, spread).item() < 0.05
    assert base.compute_loss(collapsed, collapsed).item() == 0.0


def test_sentence_target_is_the_teachers_mean_pooled_embedding_and_trains_the_student():
    torch.manual_seed(0)
    model = TextJepaForPreTraining(make_config(sentence_loss_weight=0.5))
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0  # padding must not enter the pooled target
    context, target = random_masks(3, 2, 24, 16, 8)
    context[0] = context[0].clamp(max=19)
    target[0] = target[0].clamp(max=19)
    targets, sentence = model.compute_targets(ids, mask, target.reshape(3, 16), return_sentence=True)
    # the target is exactly what the exported encoder's mean pooling gives (one segment per row)
    expected = pool_hidden_states(model.teacher(ids, attention_mask=mask).last_hidden_state, mask, "mean")
    assert sentence.shape == (3, 1, 32)
    torch.testing.assert_close(sentence[:, 0], expected)
    # token targets do not change when the sentence target is requested
    torch.testing.assert_close(targets, model.compute_targets(ids, mask, target.reshape(3, 16)))

    out = model(ids, context, target, attention_mask=mask)
    assert out.sentence_loss is not None and 0.0 < out.sentence_loss.item() <= 2.0
    torch.testing.assert_close(out.loss.detach(), out.token_loss + 0.5 * out.sentence_loss)
    out.loss.backward()
    assert model.sentence_predictor[0].weight.grad.abs().sum() > 0
    assert model.textjepa.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # weight 0 turns it off: no extra module, no extra term
    base = TextJepaForPreTraining(make_config(sentence_loss_weight=0.0))
    assert base.sentence_predictor is None
    assert base(ids, context, target).sentence_loss is None


def test_pretraining_step_in_bf16_autocast_on_cpu():
    model = TextJepaForPreTraining(make_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = random_ids()
    context, target = random_masks(3, 2, 24, 16, 8)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, context, target)
        assert out.loss.dtype == torch.float32 and out.predictions.dtype == torch.bfloat16
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(0.99)
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = TextJepaForPreTraining(make_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = random_ids()
    context, target = random_masks(3, 1, 24, 16, 8)
    losses = []
    for _ in range(30):
        loss = model(ids, context, target).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(0.996)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = TextJepaForPreTraining(make_config())
    ids = random_ids()
    context, target = random_masks(3, 1, 24, 16, 8)
    model(ids, context, target).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model.train()
    model(ids, context, target).loss.backward()
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_package_registers_auto_classes():
    assert textjepa.__version__
    config = AutoConfig.for_model("textjepa", **tiny_config_kwargs())
    assert isinstance(AutoModel.from_config(config), TextJepaModel)
    assert isinstance(AutoModelForSequenceClassification.from_config(config), TextJepaForSequenceClassification)
    assert isinstance(AutoModelForPreTraining.from_config(config), TextJepaForPreTraining)


# -- speed paths: compute only the tokens whose outputs are read ---------------------------------


@pytest.mark.parametrize("position", POSITION_SCHEMES)
@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_query_index_equals_full_forward_then_gather(position, norm, attn):
    """query_index makes the last layer compute only some tokens: same states, values and gradients."""
    config = make_config(position_embedding_type=position, norm_placement=norm, attn_implementation=attn,
                         initializer_range=0.3)
    model = TextJepaModel(config).train()
    ids = random_ids(batch=2, length=20)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 15:] = 0
    wanted = torch.tensor([[0, 3, 4, 11, 19], [2, 7, 8, 9, 14]])
    for mask in (None, attention_mask):
        full = model(ids, attention_mask=mask, output_hidden_states=True)
        part = model(ids, attention_mask=mask, output_hidden_states=True, query_index=wanted)
        expected = full.last_hidden_state.gather(1, wanted[..., None].expand(-1, -1, 32))
        assert part.last_hidden_state.shape == (2, 5, 32)
        torch.testing.assert_close(part.last_hidden_state, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part.hidden_states[-2], full.hidden_states[-2])  # earlier layers untouched
        # gradients through the shortcut equal gradients through the full pass
        weights = torch.randn(2, 5, 32)
        grads_part = torch.autograd.grad((part.last_hidden_state * weights).sum(), list(model.parameters()))
        grads_full = torch.autograd.grad((expected * weights).sum(), list(model.parameters()), allow_unused=True)
        for got, want in zip(grads_part, grads_full):
            torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, atol=1e-4, rtol=1e-3)
    # a slice works too and returns a view-based result
    sliced = model(ids, query_index=slice(12, None)).last_hidden_state
    torch.testing.assert_close(sliced, model(ids).last_hidden_state[:, 12:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITION_SCHEMES)
@pytest.mark.parametrize("target_norm", ["layer_norm", "instance_norm", "none"])
@pytest.mark.parametrize("target_num_layers", [1, 2])
def test_compute_targets_at_positions_equals_full_then_gather(position, target_norm, target_num_layers):
    model = TextJepaForPreTraining(make_config(position_embedding_type=position, target_norm=target_norm,
                                               target_num_layers=target_num_layers, initializer_range=0.3))
    ids = random_ids(batch=2, length=24)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 20:] = 0
    _, target = random_masks(2, 2, 24, num_context=10, num_target=5)  # K*Nt = 10 < L: the short path
    positions = target.reshape(2, 10)
    for mask in (None, attention_mask):
        full = model.compute_targets(ids, mask)  # (B, L, H)
        expected = full.gather(1, positions[..., None].expand(-1, -1, 32))
        got = model.compute_targets(ids, mask, positions)
        assert got.shape == (2, 10, 32) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_predictor_last_layer_shortcut_equals_full_predictor():
    """The predictor's last layer computes only the mask tokens; compare with every token computed."""
    torch.manual_seed(0)
    model = TextJepaForPreTraining(make_config(initializer_range=0.3))
    predictor = model.predictor
    context_states = torch.randn(3, 10, 32, requires_grad=True)
    context, target = random_masks(3, 1, 24, num_context=10, num_target=6)
    context, target = context[:, 0], target[:, 0]
    got = predictor(context_states, context, target)

    hidden = torch.cat([predictor.input_projection(context_states), predictor.mask_token.expand(3, 6, -1)], dim=1)
    hidden = hidden + predictor.position_embeddings(torch.cat([context, target], dim=1))
    for layer in predictor.layers:
        hidden = layer(hidden)
    expected = predictor.output_projection(predictor.norm(hidden[:, 10:]))
    assert got.shape == (3, 6, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(got)
    params = [context_states] + list(predictor.parameters())
    for a, b in zip(torch.autograd.grad((got * weights).sum(), params),
                    torch.autograd.grad((expected * weights).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
