"""Collapse diagnostics and the run's JSON-lines log.

RankMe (Garrido et al., 2023): the effective rank of a batch of embeddings Z (N, H) is
exp(entropy(p)) with p_k = s_k / sum(s) over the singular values s of Z (plus a small epsilon).
It is ~1 when every input maps to (nearly) the same direction and up to min(N, H) when the
embeddings spread over all dimensions: the figure that falls first when a JEPA collapses, while the
loss can still look healthy.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

@torch.no_grad()
def effective_rank(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe of (N, H) embeddings, computed in float64 on the CPU (N, H are a few hundred)."""
    z = embeddings.detach().to("cpu", torch.float64)
    if z.ndim != 2 or min(z.shape) == 0:
        raise ValueError(f"effective_rank: expected a non-empty (N, H) matrix, got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        return float("nan")
    singular_values = torch.linalg.svdvals(z)
    p = singular_values / singular_values.sum().clamp_min(1e-12) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def check_guards(step: int, metrics: dict, *, guard_active: bool, min_std: float, min_rank: float) -> str | None:
    """Return why the run must stop (naming the step and the figure), or None.

    NaN/Inf loss stops at any step; low std/rank only once `guard_active` (after warmup)."""
    loss = metrics.get("loss")
    if loss is not None and not math.isfinite(loss):
        return f"step {step}: loss is {loss} (NaN/Inf); stopping"
    if not guard_active:
        return None
    for key, floor in (("target_std", min_std), ("prediction_std", min_std), ("effective_rank", min_rank)):
        value = metrics.get(key)
        if value is None:
            continue
        if not math.isfinite(value) or value < floor:
            return (f"step {step}: collapse suspected: {key} = {value:.4g} is under the floor {floor:g} "
                    f"(log.min_{'rank' if key == 'effective_rank' else 'std'}); stopping")
    return None


class JsonlLog:
    """Append-only JSON-lines metrics log (main process only): one object per logged step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        except OSError as err:
            raise OSError(err.errno, f"{self.path}: cannot append the metrics record ({err.strerror})") from err

    def truncate_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint's step (they will be logged again), and
        any torn line (a crash or a full disk mid-write), with a warning. Rewritten atomically."""
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
        os.replace(tmp, self.path)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log; lines that do not parse (a torn last line) are dropped with a
    warning naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            logger.warning("%s:%d: dropped a torn or invalid record (%.40r)", path, number, line)
            continue
        records.append(record)
    return records
