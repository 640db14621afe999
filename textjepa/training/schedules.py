"""Per-optimizer-step schedules as plain functions of the step (no scheduler objects to save:
resuming at step s recomputes exactly the same values, on every process)."""

from __future__ import annotations

import math


def cosine_between(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` (step 0) to `end` (step total_steps and after)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to `lr` over warmup_steps (the first step already gets lr/warmup_steps), then
    cosine decay to `min_lr` at max_steps. `step` counts optimizer steps from 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return cosine_between(step - warmup_steps, max_steps - warmup_steps, lr, min_lr)


def weight_decay(step: int, max_steps: int, start: float, end: float | None) -> float:
    """Cosine from start to end over the whole run (I-JEPA raises it 0.04 -> 0.4); constant if end is None."""
    return start if end is None else cosine_between(step, max_steps, start, end)


def ema_momentum(step: int, max_steps: int, start: float, end: float, schedule: str) -> float | None:
    """EMA teacher momentum for optimizer step `step`: "cosine" / "linear" from start to end over the
    run, "constant" = start; "frozen" returns None: the teacher is never updated (a fixed random-target
    baseline). The one place the recipe's ema.schedule is interpreted."""
    if schedule == "frozen":
        return None
    if schedule == "constant":
        return start
    if schedule == "linear":
        progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
        return start + (end - start) * progress
    return cosine_between(step, max_steps, start, end)
