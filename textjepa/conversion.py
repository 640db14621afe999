"""Pretrained BERT-family checkpoints in and out of the textjepa encoder, exactly.

    start = read_start("path/to/all-MiniLM-L6-v2")        # a BERT / RoBERTa / XLM-R directory, or its ST folder
    config = start.textjepa_config(**jepa_fields)           # encoder fields from the checkpoint
    encoder_weights = start.textjepa_state_dict()           # TextJepaModel keys, ready for load_state_dict
    start.save_template(run_dir / "source")                 # what export needs to give the source layout back
    export_in_source_architecture(textjepa_encoder, run_dir / "source", export_dir)

How the two architectures line up (both post-norm transformer encoders):
  word_embeddings                   <-> embeddings.word_embeddings
  position_embeddings[offset + i]   <-> embeddings.position_embeddings[i] - token_type_embeddings[0]
      (every token of a single text has token type 0, so its embedding is folded into the position table;
       RoBERTa numbers positions from padding_idx + 1 = offset, BERT from 0)
  query, key, value (3 Linear)      <-> attention.qkv (one Linear, rows [q; k; v])
  attention.output.dense / LayerNorm <-> attention.output / attention_norm
  intermediate.dense, output.dense / LayerNorm <-> intermediate, mlp_output / mlp_norm
The pooler, the token-type rows and RoBERTa's leading position rows are not trained here: they are kept in
the template (source/unconverted.safetensors) and written back untouched on export.

Only this module knows both layouts; modeling_textjepa.py (copied next to native exports) never needs it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# model_type -> the transformers encoder class an export is saved as
SUPPORTED = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
TEMPLATE_WEIGHTS = "unconverted.safetensors"
TEMPLATE_INFO = "textjepa_source.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "sentencepiece.bpe.model", "added_tokens.json")


class StartError(ValueError):
    """model.init_from cannot be used: names the directory and what was expected."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StartError(f"{path}: expected a JSON file ({err})") from None


def _sentence_transformers_layout(directory: Path) -> dict | None:
    """A sentence-transformers folder -> {"transformer_path", "pooling", "normalize", "max_seq_length"}, else None.

    modules.json names the Transformer module's folder ("" = the top level) and the Pooling one; a Normalize
    module means unit-length vectors. Only mean and CLS pooling are carried over (what the encoder pools)."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file)
    layout = {"transformer_path": None, "pooling": "mean", "normalize": False, "max_seq_length": None,
              "modules": modules}
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Transformer"):
            layout["transformer_path"] = module.get("path", "")
        elif kind.endswith("Pooling"):
            pooling = _read_json(directory / module["path"] / "config.json")
            modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                     for k, on in pooling.items() if k.startswith("pooling_mode_") and on]
            if modes not in (["mean"], ["cls"]):
                raise StartError(f"{directory / module['path'] / 'config.json'}: pooling {modes}; expected mean or "
                                 "cls pooling (what textjepa's encoder pools)")
            layout["pooling"] = modes[0]
        elif kind.endswith("Normalize"):
            layout["normalize"] = True
        elif not kind.endswith(("Transformer", "Pooling", "Normalize")):
            raise StartError(f"{modules_file}: module {kind!r} is not supported; expected Transformer, Pooling "
                             "and Normalize modules")
    if layout["transformer_path"] is None:
        raise StartError(f"{modules_file}: no sentence_transformers.models.Transformer module")
    st_config = directory / layout["transformer_path"] / "sentence_bert_config.json"
    if st_config.is_file():
        layout["max_seq_length"] = _read_json(st_config).get("max_seq_length")
    return layout


@dataclass
class Start:
    """A pretrained encoder to start from: its directory, transformers config, weights and pooling."""

    directory: Path  # what the user gave
    transformer_dir: Path  # where config.json and the weights are
    hf_config: dict
    layout: dict | None  # sentence-transformers layout, or None for a plain transformers directory

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    @property
    def position_offset(self) -> int:
        """Rows of the source position table before position 0 (RoBERTa: padding_idx + 1; BERT: 0)."""
        return 0 if self.model_type == "bert" else (self.hf_config.get("pad_token_id") or 0) + 1

    @property
    def pooling(self) -> str:
        return self.layout["pooling"] if self.layout else "mean"

    def source_state_dict(self) -> dict:
        from safetensors.torch import load_file

        weights = self.transformer_dir / "model.safetensors"
        if weights.is_file():
            state = load_file(str(weights))
        elif (self.transformer_dir / "pytorch_model.bin").is_file():
            state = torch.load(self.transformer_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise StartError(f"{self.transformer_dir}: no model.safetensors or pytorch_model.bin")
        # *ForMaskedLM / sentence-transformers checkpoints prefix the encoder ("bert.", "roberta.")
        prefix = next((p for p in ("bert.", "roberta.", "model.") if any(k.startswith(p + "embeddings.") for k in state)), "")
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def textjepa_config(self, **fields):
        """A TextJepaConfig with this checkpoint's encoder (post-norm, its epsilon, activation and sizes) and
        `fields` for the rest (predictor, loss, EMA; encoder fields given here are overridden)."""
        from textjepa import TextJepaConfig

        c = self.hf_config
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise StartError(f"{self.transformer_dir / 'config.json'}: position_embedding_type "
                             f"{c['position_embedding_type']!r}; expected 'absolute'")
        encoder = dict(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
            hidden_act=c.get("hidden_act", "gelu"), layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            max_position_embeddings=c["max_position_embeddings"] - self.position_offset,
            position_embedding_type="absolute", norm_placement="post", initializer_range=c.get("initializer_range", 0.02),
            pad_token_id=c.get("pad_token_id"), bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
            classifier_pooling=self.pooling)
        return TextJepaConfig(**{**fields, **encoder})

    def textjepa_state_dict(self) -> dict:
        """The checkpoint's weights under TextJepaModel's names (see the module doc for the mapping)."""
        return to_textjepa(self.source_state_dict(), self.hf_config["num_hidden_layers"], self.position_offset)

    def save_template(self, directory) -> Path:
        """Everything export needs besides the trained encoder: the source config, tokenizer and
        sentence-transformers files, and its untrained tensors (pooler, token types, leading positions)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tmp = directory.parent / f".tmp-{directory.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = self.source_state_dict()
        kept = {k: v.contiguous() for k, v in state.items() if k.startswith("pooler.")}
        kept["embeddings.token_type_embeddings.weight"] = state["embeddings.token_type_embeddings.weight"]
        kept["embeddings.position_embeddings.weight"] = state["embeddings.position_embeddings.weight"][:self.position_offset + 1].clone()
        save_file(kept, str(tmp / TEMPLATE_WEIGHTS))
        (tmp / "config.json").write_text(json.dumps(self.hf_config, indent=2))
        for name in TOKENIZER_FILES:
            if (self.transformer_dir / name).is_file():
                shutil.copyfile(self.transformer_dir / name, tmp / name)
        info = {"source": str(self.directory), "model_type": self.model_type, "pooling": self.pooling,
                "normalize": bool(self.layout and self.layout["normalize"]),
                "max_seq_length": self.layout["max_seq_length"] if self.layout else None}
        (tmp / TEMPLATE_INFO).write_text(json.dumps(info, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
        return directory


def read_start(path) -> Start:
    """model.init_from -> Start. A local transformers directory (BertModel, RobertaModel, XLMRobertaModel,
    or their *ForMaskedLM) or a sentence-transformers folder holding one. Raises StartError, one line."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise StartError(f"model.init_from: {path}: not a directory; expected a local BERT or RoBERTa checkpoint "
                         "directory (config.json + model.safetensors) or a sentence-transformers folder")
    layout = _sentence_transformers_layout(directory)
    transformer_dir = directory / layout["transformer_path"] if layout else directory
    config_file = transformer_dir / "config.json"
    if not config_file.is_file():
        raise StartError(f"model.init_from: {transformer_dir}: no config.json; expected a transformers model directory")
    hf_config = _read_json(config_file)
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED:
        raise StartError(f"model.init_from: {config_file}: model_type {model_type!r} is not supported; expected one "
                         f"of {sorted(SUPPORTED)} (BertModel, RobertaModel, XLMRobertaModel; or a textjepa export: "
                         "use it as data.tokenizer + a from-scratch recipe)")
    return Start(directory, transformer_dir, hf_config, layout)


# One layer's one-to-one tensors: (TextJepaLayer name, BertLayer / RobertaLayer name); q, k, v <-> qkv apart
LAYER_NAMES = (("attention.output", "attention.output.dense"), ("attention_norm", "attention.output.LayerNorm"),
               ("intermediate", "intermediate.dense"), ("mlp_output", "output.dense"), ("mlp_norm", "output.LayerNorm"))


def to_textjepa(state: dict, num_layers: int, position_offset: int) -> dict:
    """BertModel/RobertaModel state dict (no prefix) -> TextJepaModel state dict (post-norm encoder)."""
    token_type = state["embeddings.token_type_embeddings.weight"][0]  # (H,)
    out = {
        "embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight":
            state["embeddings.position_embeddings.weight"][position_offset:] + token_type,
        "embeddings.LayerNorm.weight": state["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attention.qkv.{part}"] = torch.cat(
                [state[src + f"attention.self.{name}.{part}"] for name in ("query", "key", "value")])
            for ours, theirs in LAYER_NAMES:
                out[dst + f"{ours}.{part}"] = state[src + f"{theirs}.{part}"]
    return {k: v.detach().clone().float().contiguous() for k, v in out.items()}


def from_textjepa(state: dict, template: dict, num_layers: int, position_offset: int) -> dict:
    """TextJepaModel state dict + the template's untrained tensors -> BertModel/RobertaModel state dict."""
    token_type = template["embeddings.token_type_embeddings.weight"]
    positions = state["embeddings.position_embeddings.weight"] - token_type[0]
    out = {
        "embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight":
            torch.cat([template["embeddings.position_embeddings.weight"][:position_offset], positions]),
        "embeddings.token_type_embeddings.weight": token_type,
        "embeddings.LayerNorm.weight": state["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": state["embeddings.LayerNorm.bias"],
    }
    out.update({k: v for k, v in template.items() if k.startswith("pooler.")})
    for i in range(num_layers):
        src, dst = f"layers.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            query, key, value = state[src + f"attention.qkv.{part}"].chunk(3)
            out[dst + f"attention.self.query.{part}"] = query
            out[dst + f"attention.self.key.{part}"] = key
            out[dst + f"attention.self.value.{part}"] = value
            for ours, theirs in LAYER_NAMES:
                out[dst + f"{theirs}.{part}"] = state[src + f"{ours}.{part}"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export_in_source_architecture(encoder, template_dir, output_dir) -> Path:
    """Write `encoder` (a TextJepaModel converted from a Start) into output_dir as the source architecture:
    config.json (the source's), model.safetensors under the source's names, its tokenizer, and a
    sentence-transformers layout with the source's pooling and normalisation. output_dir is written in place
    (callers write into a temporary directory and rename it)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    template_dir, output_dir = Path(template_dir), Path(output_dir)
    info = _read_json(template_dir / TEMPLATE_INFO)
    hf_config = _read_json(template_dir / "config.json")
    template = load_file(str(template_dir / TEMPLATE_WEIGHTS))
    offset = 0 if info["model_type"] == "bert" else (hf_config.get("pad_token_id") or 0) + 1
    state = from_textjepa(encoder.state_dict(), template, hf_config["num_hidden_layers"], offset)
    config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k not in ("transformers_version",)})
    config.architectures = [SUPPORTED[info["model_type"]]]
    model = AutoModel.from_config(config, add_pooling_layer=any(k.startswith("pooler.") for k in state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export to {info['model_type']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    for name in TOKENIZER_FILES:
        if (template_dir / name).is_file():
            shutil.copyfile(template_dir / name, output_dir / name)
    from textjepa.embedding.sentence_transformers_export import write_sentence_transformers_layout

    max_seq_length = info["max_seq_length"] or hf_config["max_position_embeddings"] - offset
    write_sentence_transformers_layout(output_dir, pooling=info["pooling"], normalize=info["normalize"],
                                       max_seq_length=int(max_seq_length), hidden_size=hf_config["hidden_size"])
    return output_dir


def source_template_of(output_dir) -> Path | None:
    """The template a run that started from a checkpoint keeps in its output_dir (or a checkpoint) as source/."""
    path = Path(output_dir) / "source"
    return path if (path / TEMPLATE_INFO).is_file() else None


__all__ = ["SUPPORTED", "Start", "StartError", "read_start", "to_textjepa", "from_textjepa",
           "export_in_source_architecture", "source_template_of"]
