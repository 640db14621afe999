"""Pretraining with accelerate: recipes, the loop, checkpoints, diagnostics, export.

    recipe.py       YAML recipes -> typed dataclasses (named errors, --set overrides)
    batches.py      tokenizer + packed blocks, deterministic micro-batches (exact resume)
    build.py        TextJepaForPreTraining / RobertaForMaskedLM and AdamW param groups
    schedules.py    warmup + cosine LR, weight-decay schedule
    loop.py         the accelerate training loop (train(recipe, resume=...))
    checkpoint.py   atomic checkpoint directories, TrainerState, save/load of a run, keep-last-k
    diagnostics.py  RankMe effective rank, collapse / NaN guards, JSON-lines log
    export.py       from_pretrained-ready encoder + tokenizer + model card (`textjepa export`)
    plots.py        training curves PNG
Entry point: `textjepa train --recipe recipes/quickstart.yaml` (textjepa/train.py).
"""
