"""Model and optimizer for a recipe: TextJepaForPreTraining (objective jepa) or HF RobertaForMaskedLM
(objective mlm) with the same encoder sizes, and AdamW with decay / no-decay parameter groups."""

from __future__ import annotations

import torch

from textjepa.optimization import adamw, takes_weight_decay

from . import schedules


def jepa_config(recipe, tokenizer):
    """The recipe's model and ema sections are TextJepaConfig fields (recipe.model_config_kwargs), plus the
    tokenizer's vocabulary size and special ids; with model.init_from the checkpoint sets the encoder fields."""
    from textjepa import TextJepaConfig

    from .recipe import model_config_kwargs

    if recipe.model.init_from:
        from textjepa.conversion import read_start

        return read_start(recipe.model.init_from).textjepa_config(**model_config_kwargs(recipe))
    return TextJepaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **model_config_kwargs(recipe))


def roberta_config(vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, max_tokens,
                   pad_token_id, bos_token_id, eos_token_id, **overrides):
    """A RobertaConfig with the encoder sizes of a TextJepaConfig, whose position table holds
    `max_tokens` tokens (plus RoBERTa's position offset)."""
    from transformers import RobertaConfig

    from textjepa.data import roberta_position_offset

    return RobertaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_tokens + roberta_position_offset(pad_token_id), type_vocab_size=1,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **overrides)


def mlm_config(recipe, tokenizer):
    """RoBERTa of the recipe's encoder size, for blocks of data.block_size tokens."""
    model = recipe.model
    return roberta_config(
        len(tokenizer), model.hidden_size, model.num_hidden_layers, model.num_attention_heads,
        model.intermediate_size, model.max_position_embeddings or recipe.data.block_size,
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
        hidden_dropout_prob=model.hidden_dropout_prob, attention_probs_dropout_prob=model.attention_probs_dropout_prob,
        layer_norm_eps=1e-5)


def build_model(recipe, tokenizer):
    if recipe.objective == "mlm":
        from transformers import RobertaForMaskedLM

        return RobertaForMaskedLM(mlm_config(recipe, tokenizer))
    from textjepa import TextJepaForPreTraining

    model = TextJepaForPreTraining(jepa_config(recipe, tokenizer))
    if recipe.model.init_from:  # the student starts as the checkpoint; the teacher is copied from it later
        from textjepa.conversion import read_start

        model.textjepa.load_state_dict(read_start(recipe.model.init_from).textjepa_state_dict(), strict=True)
    freeze_student_parts(model.textjepa, recipe.optim.freeze_embeddings, recipe.optim.freeze_layers)
    return model


def freeze_student_parts(encoder, embeddings: bool, layers: int) -> None:
    """optim.freeze_embeddings / optim.freeze_layers: no gradients for the embeddings / the lowest `layers`
    layers of the student (the EMA teacher then keeps them as they started)."""
    if layers > len(encoder.layers):
        raise ValueError(f"optim.freeze_layers: {layers} is more than the encoder's {len(encoder.layers)} layers")
    if embeddings:
        encoder.embeddings.requires_grad_(False)
    for layer in encoder.layers[:layers]:
        layer.requires_grad_(False)


def encoder_of(model):
    """The encoder whose pooled outputs feed the effective-rank probe (teacher for JEPA)."""
    return model.roberta if hasattr(model, "roberta") else model.teacher


def parameter_groups(model) -> list[dict]:
    """Decay / no-decay groups (takes_weight_decay); `apply_decay` lets the loop set each group's decay
    per step."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if takes_weight_decay(name, param) else no_decay).append(param)
    return [{"params": decay, "apply_decay": True, "weight_decay": 0.0},
            {"params": no_decay, "apply_decay": False, "weight_decay": 0.0}]


def build_optimizer(model, recipe, device: torch.device):
    """AdamW with decay / no-decay groups, fused where this torch supports it on `device` (optim.fused:
    null = try). The learning rate and weight decay come from the schedules only (schedules.py): the loop
    writes step s's values into every group before step s (loop._set_schedules)."""
    optim = recipe.optim
    # starts at step 0's scheduled lr, so that optim.lr is read by the schedule alone (no other lr is ever used)
    first_lr = schedules.learning_rate(0, recipe.train.max_steps, optim.warmup_steps, optim.lr, optim.min_lr)
    return adamw(parameter_groups(model), fused=optim.fused, device=device, lr=first_lr, betas=tuple(optim.betas),
                 eps=optim.eps)
