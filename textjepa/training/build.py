"""Model and optimizer for a recipe: TextJepaForPreTraining (objective jepa) or HF RobertaForMaskedLM
(objective mlm) with the same encoder sizes, and AdamW with decay / no-decay parameter groups."""

from __future__ import annotations

import dataclasses

import torch


def jepa_config(recipe, tokenizer):
    """The recipe's model and ema sections are TextJepaConfig fields (recipe.py builds them from it):
    null keeps the config's default, max_position_embeddings defaults to data.block_size."""
    from textjepa import TextJepaConfig

    from .recipe import EMA_PREFIX

    kwargs = {k: v for k, v in dataclasses.asdict(recipe.model).items() if v is not None}
    kwargs["max_position_embeddings"] = recipe.model.max_position_embeddings or recipe.data.block_size
    kwargs.update({EMA_PREFIX + k: v for k, v in dataclasses.asdict(recipe.ema).items()})
    return TextJepaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **kwargs)


def mlm_config(recipe, tokenizer):
    """RoBERTa of the same size. RoBERTa numbers positions from padding_idx + 1, so a block of L
    tokens needs max_position_embeddings = L + 2."""
    from transformers import RobertaConfig

    m = recipe.model
    return RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
        max_position_embeddings=(m.max_position_embeddings or recipe.data.block_size) + 2, type_vocab_size=1,
        hidden_dropout_prob=m.hidden_dropout_prob, attention_probs_dropout_prob=m.attention_probs_dropout_prob,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, layer_norm_eps=1e-5)


def build_model(recipe, tokenizer):
    if recipe.objective == "mlm":
        from transformers import RobertaForMaskedLM

        return RobertaForMaskedLM(mlm_config(recipe, tokenizer))
    from textjepa import TextJepaForPreTraining

    return TextJepaForPreTraining(jepa_config(recipe, tokenizer))


def encoder_of(model):
    """The encoder whose pooled outputs feed the effective-rank probe (teacher for JEPA)."""
    return model.roberta if hasattr(model, "roberta") else model.teacher


def parameter_groups(model) -> list[dict]:
    """Weight decay on matrices only: biases, LayerNorm weights and mask tokens (ndim < 2 or named
    *norm* / *mask_token*) get none. `apply_decay` lets the loop set each group's decay per step."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "norm" in name.lower() or "mask_token" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "apply_decay": True, "weight_decay": 0.0},
            {"params": no_decay, "apply_decay": False, "weight_decay": 0.0}]


def build_optimizer(model, recipe, device: torch.device):
    """AdamW, fused where this torch supports it on `device` (optim.fused: null = try), else foreach.
    lr and weight decay are set by the loop before every optimizer step."""
    o = recipe.optim
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.fused is not False:
        try:
            return torch.optim.AdamW(parameter_groups(model), fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError) as err:
            if o.fused:
                raise RuntimeError(f"optim.fused: true but fused AdamW is unavailable on {device}: {err}") from err
    return torch.optim.AdamW(parameter_groups(model), foreach=True, **kwargs)
