"""Export a pretraining run as a `from_pretrained`-ready encoder directory + tokenizer + model card.

    textjepa export --checkpoint runs/x/checkpoint-00001000 --output my-encoder [--which teacher|student]

JEPA: the teacher (default) or student as a plain TextJepaModel (model.export_encoder).
MLM: RobertaForMaskedLM's encoder saved as a RobertaModel (with a freshly initialised, untrained
pooler so that AutoModel's default RobertaModel loads it without missing-key warnings; use mean
pooling of last_hidden_state, as for the JEPA encoder).
Every export is self-describing: a JEPA export's config.json has `auto_map` and the directory holds
configuration_textjepa.py / modeling_textjepa.py (AutoModel / AutoModelForSequenceClassification with
trust_remote_code=True need no textjepa), and both kinds carry the sentence-transformers layout
(modules.json, 1_Pooling/, 3_Normalize/, and 2_Dense/ once whitening is shipped).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import (COMPLETE_MARKER, TEACHER_FILE, fsync_tree, latest_checkpoint, read_trainer_state, replace_directory,
                         verify_checkpoint)
from .process import fault_point


class ExportError(ValueError):
    """The checkpoint cannot be exported (non-finite weights, missing or mismatched files); names the path."""


def _export_mlm_encoder(mlm_model, output_dir: Path) -> None:
    from transformers import RobertaModel

    config = mlm_model.config.__class__.from_dict(mlm_model.config.to_dict())
    config.architectures = ["RobertaModel"]
    encoder = RobertaModel(config, add_pooling_layer=True)
    missing, unexpected = encoder.load_state_dict(mlm_model.roberta.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(f"MLM export: unexpected {unexpected}, missing {missing}")
    encoder.save_pretrained(output_dir)


def model_card(recipe, trainer_state, which: str, config) -> str:
    metrics = dict(trainer_state.last_metrics or {}) if trainer_state is not None else {}
    figures = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in metrics.items() if v is not None)
    kind = (f"Text-JEPA encoder ({which} of the EMA pair)" + (
                f", continued from {recipe.model.init_from} and saved in its architecture (no trust_remote_code "
                "needed)" if recipe.model.init_from else "") if recipe.objective == "jepa"
            else "RoBERTa-style encoder trained with masked language modelling (textjepa MLM baseline)")
    steps = trainer_state.step if trainer_state is not None else "?"
    tokens = f"{trainer_state.tokens_seen:,}" if trainer_state is not None else "?"
    m = config  # the encoder's own sizes (with model.init_from: the checkpoint's, not the recipe's defaults)
    remote = "" if recipe.model.init_from else ", trust_remote_code=True"
    return f"""---
library_name: transformers
tags: [textjepa, {recipe.objective}, feature-extraction, sentence-transformers]
---
# {kind}

Pretrained with [textjepa](https://github.com/) (`objective: {recipe.objective}`): {m.num_hidden_layers} layers,
hidden size {m.hidden_size}, {m.num_attention_heads} heads, blocks of {recipe.data.block_size} tokens,
{steps} optimizer steps, **{tokens} tokens seen**, data: `{recipe.data.source}`.

```python
from transformers import AutoModel, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("PATH")
model = AutoModel.from_pretrained("PATH"{remote}){"" if recipe.model.init_from else "  # or `import textjepa` first"}
batch = tokenizer(["A sentence to embed."], return_tensors="pt")
states = model(**batch).last_hidden_state                     # (batch, tokens, hidden)
mask = batch["attention_mask"].unsqueeze(-1)
embedding = (states * mask).sum(1) / mask.sum(1)             # mean pooling
```

Sentence embeddings as textjepa's SentenceEncoder gives them (the pooling, shipped whitening and normalisation
of modules.json):

```python
from sentence_transformers import SentenceTransformer
vectors = SentenceTransformer("PATH"{remote}).encode(["A sentence to embed."])
```
{"The pooler of this RobertaModel is untrained (added so AutoModel loads without warnings); use mean pooling." if recipe.objective == "mlm" else ""}

## Final training diagnostics
| figure | value |
|---|---|
{figures}

## Recipe (resolved)
```yaml
{recipe.to_yaml().rstrip()}
```
"""


def check_finite(model, where) -> None:
    """Refuse to export NaN/Inf weights (a diverged run), naming the first bad tensor."""
    tensors = list(model.state_dict().items())
    if hasattr(model, "teacher_state_dict"):  # the EMA teacher lives outside state_dict (JEPA)
        tensors += [(f"teacher.{k}", v) for k, v in model.teacher_state_dict().items()]
    bad = [name for name, tensor in tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ExportError(f"{where}: {len(bad)} of {len(tensors)} tensors hold NaN/Inf (first: {bad[0]}); "
                          "the run diverged: export an earlier checkpoint")


def write_sentence_transformers_layout(export_dir, config, tokenizer) -> None:
    """modules.json, pooling and normalisation (as SentenceEncoder encodes), so SentenceTransformer(export_dir,
    trust_remote_code=True) gives SentenceEncoder's vectors; a whitening shipped later adds its Dense module."""
    from textjepa.embedding.model_dir import default_max_length
    from textjepa.embedding.sentence_transformers_export import write_sentence_transformers_layout as write

    write(export_dir, pooling="mean", normalize=True, max_seq_length=default_max_length(config, tokenizer),
          hidden_size=config.hidden_size)


def export_model(model, recipe, tokenizer, output_dir, which: str = "teacher", trainer_state=None,
                 source_template=None) -> Path:
    """Write the encoder, the tokenizer, the sentence-transformers layout and README.md into output_dir
    (model: the unwrapped TextJepaForPreTraining or RobertaForMaskedLM). A JEPA export also carries
    `auto_map` and configuration_textjepa.py / modeling_textjepa.py, so it loads with
    trust_remote_code=True where textjepa is not installed. A run that started from a checkpoint
    (model.init_from; source_template: its run's or checkpoint's source/ folder) is written in the source
    architecture instead (BertModel / RobertaModel, the source's tokenizer, pooling and normalisation).
    Written into `.tmp-export-<name>` beside it and then renamed, so output_dir always holds one whole export
    (a previous one is replaced)."""
    output_dir = Path(output_dir)
    check_finite(model, f"{output_dir}: the model to export")
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"{output_dir}: exists and is a file; expected a directory to export into")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / "config.json").is_file():
        raise ExportError(f"{output_dir}: exists and holds files that are not an export; pick an empty or new "
                          "directory")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.parent / f".tmp-export-{output_dir.name}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    if source_template is not None:
        from textjepa.conversion import export_in_source_architecture

        encoder = model.teacher if which == "teacher" else model.textjepa
        export_in_source_architecture(encoder, source_template, tmp_dir)  # + its tokenizer and ST layout
        fault_point("export", trainer_state.step if trainer_state is not None else -1)
    else:
        if recipe.objective == "jepa":
            model.export_encoder(str(tmp_dir), which=which, auto_map=True)  # + the two model files
        else:
            _export_mlm_encoder(model, tmp_dir)
        fault_point("export", trainer_state.step if trainer_state is not None else -1)
        tokenizer.save_pretrained(str(tmp_dir))
        write_sentence_transformers_layout(tmp_dir, model.config, tokenizer)
    (tmp_dir / "README.md").write_text(model_card(recipe, trainer_state, which, model.config))
    fsync_tree(tmp_dir)
    return replace_directory(tmp_dir, output_dir)  # a previous export is swapped out, then deleted


def load_checkpoint_model(checkpoint_dir):
    """Rebuild (recipe, model with student + teacher weights, tokenizer, trainer state) from a checkpoint."""
    from safetensors.torch import load_file

    from textjepa.data import load_tokenizer

    from .build import build_model
    from .recipe import load_recipe

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: not a complete textjepa checkpoint (no {COMPLETE_MARKER})")
    recipe = load_recipe(checkpoint_dir / "recipe.yaml")
    problem = verify_checkpoint(checkpoint_dir, TEACHER_FILE if recipe.objective == "jepa" else None)
    if problem and "optimizer" not in problem:  # export needs the weights, not the optimizer state
        raise ExportError(problem)
    try:
        state = read_trainer_state(checkpoint_dir)
    except (ValueError, TypeError) as err:
        raise ExportError(f"{checkpoint_dir / COMPLETE_MARKER}: expected the JSON object a checkpoint "
                          f"writes ({err})") from None
    tokenizer = load_tokenizer(checkpoint_dir / "tokenizer")
    if recipe.model.init_from:  # the architecture is the checkpoint's own config.json, not the (maybe moved) start
        from textjepa import TextJepaConfig, TextJepaForPreTraining

        model = TextJepaForPreTraining(TextJepaConfig.from_pretrained(checkpoint_dir))
    else:
        model = build_model(recipe, tokenizer)
    weights = load_file(str(checkpoint_dir / "model.safetensors"))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # size mismatches: the first one is enough to name the problem
        detail = next((line.strip() for line in str(err).split(". ") if "size mismatch" in line), str(err)[:200])
        raise ExportError(f"{checkpoint_dir}/model.safetensors does not match the recipe's model in "
                          f"{checkpoint_dir}/recipe.yaml ({detail})") from None
    # safetensors drops tied copies (MLM decoder weight = word embeddings): only those may be missing
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(f"{checkpoint_dir}/model.safetensors does not match the recipe's model: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if recipe.objective == "jepa":
        try:
            model.load_teacher_state_dict(load_file(str(checkpoint_dir / TEACHER_FILE)))
        except RuntimeError as err:
            raise ExportError(f"{checkpoint_dir / TEACHER_FILE} does not match the recipe's model "
                              f"({str(err).splitlines()[0]})") from None
    return recipe, model, tokenizer, state


def export_checkpoint(checkpoint_dir, output_dir, which: str = "teacher") -> Path:
    recipe, model, tokenizer, state = load_checkpoint_model(checkpoint_dir)
    check_finite(model, checkpoint_dir)
    template = None
    if recipe.model.init_from:
        template = Path(checkpoint_dir) / "source"
        if not template.is_dir():
            raise ExportError(f"{template}: missing; a checkpoint of a run with model.init_from keeps the source "
                              "architecture's template there (config, tokenizer, untrained tensors)")
    return export_model(model, recipe, tokenizer, output_dir, which=which, trainer_state=state,
                        source_template=template)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="textjepa export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint-NNNNNNNN directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--output", required=True, help="directory to write the encoder to")
    parser.add_argument("--which", choices=["teacher", "student"], default="teacher",
                        help="JEPA only: export the EMA teacher (default) or the student")
    args = parser.parse_args(argv)
    checkpoint_dir = Path(args.checkpoint)
    if not (checkpoint_dir / COMPLETE_MARKER).is_file():
        latest = latest_checkpoint(checkpoint_dir)
        if latest is None:
            print(f"textjepa export: {checkpoint_dir} is neither a checkpoint nor a run directory with "
                  "checkpoint-* folders", file=sys.stderr)
            return 2
        checkpoint_dir = latest
    with torch.no_grad():
        out = export_checkpoint(checkpoint_dir, args.output, which=args.which)
    print(f"exported the encoder of {checkpoint_dir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
