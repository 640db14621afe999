"""The optimizer rules pretraining (textjepa.training) and GLUE fine-tuning (textjepa.evaluation.glue) share.

Below both: fine-tuning groups its parameters the way pretraining does without importing the trainer."""

import torch


def takes_weight_decay(name: str, param) -> bool:
    """Weight decay on matrices only: biases, LayerNorm weights and mask tokens (ndim < 2 or named
    *norm* / *mask_token*) get none."""
    return not (param.ndim < 2 or "norm" in name.lower() or "mask_token" in name)


def adamw(params, fused: bool | None = None, device=None, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused where this torch supports it (fused None: try; True: required), else foreach."""
    params = list(params)
    if fused is not False:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError) as err:
            if fused:
                raise RuntimeError(f"optim.fused: true but fused AdamW is unavailable on {device}: {err}") from err
    return torch.optim.AdamW(params, foreach=True, **kwargs)
