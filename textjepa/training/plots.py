"""Training curves from the JSON-lines log into one PNG (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

from .diagnostics import read_jsonl

PANELS = [  # (metric key, title, log scale); EXTRA_KEYS share a panel with their key
    ("loss", "loss (total, and its terms)", True),
    ("lr", "learning rate", False),
    ("target_std", "target / prediction std", False),
    ("effective_rank", "effective rank (RankMe, probe batch)", False),
    ("grad_norm", "grad norm", True),
    ("tokens_per_s", "tokens / s", False),
]

EXTRA_KEYS = {"loss": ["token_loss", "span_loss", "sentence_loss", "cross_view_loss", "bottleneck_loss", "pooled_reg"],
              "target_std": ["prediction_std"]}


def plot_training_curves(log_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_path)
    if not records:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, panel_title, log_scale) in zip(axes.flat, PANELS):
        keys = [key] + EXTRA_KEYS.get(key, [])
        for k in keys:
            points = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=k, marker="." if len(points) < 30 else None)
        if log_scale and ax.lines and all(v > 0 for line in ax.lines for v in line.get_ydata()):
            ax.set_yscale("log")
        if len(keys) > 1 and ax.lines:
            ax.legend()
        ax.set_title(panel_title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
