"""Recipes: YAML files with sections model / data / mask / optim / ema / train / log (+ `objective`),
parsed into typed dataclasses. Unknown keys and wrong types are errors that name the file and key:

    recipes/small.yaml: optim.lr: expected float, got 'abc'

Command-line overrides use dotted keys: `--set optim.lr=3e-4 --set train.max_steps=200`; values are
read as YAML scalars (so `true`, `[0.9, 0.98]`, `null` work) and then type-checked like the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from textjepa.configuration_textjepa import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    UNIT_OPEN,
    UNIT_RIGHT_OPEN,
    SettingError,
    TextJepaConfig,
    range_problem,
)
from textjepa.masking import MaskingConfig

EMA_PREFIX = "ema_"  # recipe ema.<key> is TextJepaConfig.ema_<key>


class RecipeError(ValueError):
    """A recipe that does not parse; the message names the file and the dotted key."""


@dataclass
class ModelSection:
    """Encoder + predictor sizes; maps 1:1 onto TextJepaConfig fields (MLM uses the encoder ones).

    vocab_size and pad_token_id come from the tokenizer; max_position_embeddings defaults to
    data.block_size. Fields left at null keep TextJepaConfig's own default.
    init_from: a local BERT / RoBERTa / XLM-RoBERTa directory or a sentence-transformers folder holding one
    (textjepa.conversion): the student and the teacher start as that checkpoint, converted exactly; its
    architecture sets the encoder fields (sizes, epsilon, activation, positions: the ones here are not used),
    its tokenizer drives the data, and the export is written back in its architecture.
    """

    # Each key but the last two is the TextJepaConfig field of the same name (configuration_textjepa.py says
    # what it does). A key typed Optional and left at null keeps the config's own default; the others have the
    # config's default (test_recipe checks that they stay equal).
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: Optional[int] = None  # null: data.block_size
    position_embedding_type: Optional[Literal["absolute", "rotary"]] = None
    norm_placement: Optional[Literal["pre", "post"]] = None
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    predictor_hidden_size: Optional[int] = None
    predictor_num_hidden_layers: Optional[int] = None
    predictor_num_attention_heads: Optional[int] = None
    target_num_layers: Optional[int] = None  # teacher layers averaged into the target
    target_norm: Optional[Literal["layer_norm", "instance_norm", "none"]] = None
    loss_type: Optional[Literal["smooth_l1", "mse"]] = None
    smooth_l1_beta: Optional[float] = None
    variance_reg_weight: Optional[float] = None
    # loss weights (0 = off)
    sentence_loss_weight: Optional[float] = None
    sentence_loss_type: Optional[Literal["cosine", "infonce"]] = None
    sentence_temperature: Optional[float] = None
    token_loss_weight: Optional[float] = None
    span_loss_weight: Optional[float] = None
    cross_view_loss_weight: Optional[float] = None  # needs view pairs: mask.num_views >= 2 or views: document_halves
    cross_view_target: Optional[Literal["teacher", "student"]] = None
    bottleneck_loss_weight: Optional[float] = None
    context_loss_weight: Optional[float] = None
    pooled_reg: Optional[Literal["none", "vicreg", "sigreg", "uniformity"]] = None
    pooled_reg_weight: Optional[float] = None
    sigreg_num_slices: Optional[int] = None
    uniformity_t: Optional[float] = None
    pooled_reg_view: Optional[Literal["context", "full"]] = None
    pooled_reg_bank: Optional[int] = None
    pooled_reg_bank_source: Optional[Literal["teacher", "student"]] = None
    pooled_reg_skip_same_document: Optional[bool] = None
    pooled_reg_drift_budget: Optional[float] = None
    pooled_head: Optional[Literal["mlp", "residual", "identity"]] = None
    classifier_pooling: Optional[Literal["mean", "cls"]] = None
    # recipe-only keys
    attn_implementation: Optional[Literal["sdpa", "eager"]] = None  # a PreTrainedConfig kwarg
    init_from: Optional[str] = None  # not a config field: build.build_model reads it


@dataclass
class DataSection:
    """Where text comes from and how it becomes blocks of token ids.

    source: "quickstart" (the corpus shipped in textjepa/corpus), local files/globs (txt, jsonl, csv,
    parquet) or a hub dataset name. tokenizer: a tokenizer directory; null trains one on the source
    (saved in <output_dir>/tokenizer and reused on the next run). packed_path: a `save_to_disk`
    dataset with one `input_ids` column of block_size ids, used instead of tokenizing the source.

    streaming: true reads the source as a stream (datasets' IterableDataset; local files or hub names)
    and tokenizes and packs it on the fly, for corpora bigger than memory or disk; false (the default)
    tokenizes all of it to Arrow before step 1. Every process reads the whole stream and keeps its share
    of each batch; an epoch is one pass, then the next one begins, reshuffled; `--resume` re-reads the
    current epoch and skips what was trained on (exact). The validation split is about
    validation_fraction of the documents, chosen by a hash of their text, and the effective-rank probe
    takes the first log.probe_size validation blocks. With shuffle_buffer 0 a run equals the Arrow
    path's over the same blocks in order (batches.StreamedMicroBatches says exactly what is equal).
    shuffle_buffer: blocks in the streaming shuffle buffer, reseeded every epoch (0 or 1: the stream's
    order). With tokenizer null the tokenizer is still trained on the whole source, read into Arrow: for
    a big corpus train one on a sample first (`textjepa tokenizer train --max-chars`).
    """

    source: Union[str, list[str]] = "quickstart"
    text_column: str = "text"
    tokenizer: Optional[str] = None
    vocab_size: int = 8000
    tokenizer_model: Literal["unigram", "bpe"] = "unigram"
    block_size: int = 128
    packed_path: Optional[str] = None
    validation_fraction: float = 0.01
    num_proc: int = 1
    cache_dir: Optional[str] = None
    num_workers: int = 0  # DataLoader workers building micro-batches (masks); 0 = in the training process
    # sampling weight per source file, keyed by file name without extension ({linux_doc_rst: 0.3, sotu: 2});
    # unlisted files weigh 1. A weight w keeps each training document floor(w) times plus once more with
    # probability w - floor(w) (seeded), before packing; the validation split keeps the natural mixture.
    weights: Optional[dict[str, float]] = None
    streaming: bool = False
    shuffle_buffer: int = 10000


@dataclass
class MaskSection:
    """JEPA masks: the fields of textjepa.masking.MaskingConfig (see the contract for meanings);
    batches.masking_config turns the section into one.

    mlm_probability is used only by `objective: mlm` (HF DataCollatorForLanguageModeling).
    special_tokens_never_target: the tokenizer's special ids are passed as special_token_ids.
    num_spans: null with mean_span_length set (data2vec-like many short spans). num_views 2, 4, ...:
    each block becomes that many segments (the cross-view target's pairs); views: document_halves:
    segments per half document (cross-view pairs).
    """

    # MaskingConfig's fields of the same name and default (test_recipe checks that they stay equal)
    num_masks: int = 1
    target_ratio: float = 0.3
    num_spans: Optional[int] = 4
    span_length_distribution: Literal["uniform", "geometric", "poisson"] = "uniform"
    mean_span_length: Optional[float] = None
    min_span_length: int = 1
    extra_context_drop: float = 0.0
    allow_overlap: bool = False
    num_views: int = 1
    views: Literal["none", "document_halves", "documents"] = "none"
    # recipe-only keys
    special_tokens_never_target: bool = True
    mlm_probability: float = 0.15


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine decay to min_lr; weight decay follows a cosine from
    weight_decay to weight_decay_end (null: constant). No decay on biases, norms and mask tokens.
    warmup_steps may exceed train.max_steps (short smoke runs): the LR then only ramps up.
    freeze_embeddings / freeze_layers: keep the student's embeddings / its lowest N transformer layers fixed
    (no gradients, not in the optimizer), the usual guard against forgetting when continuing a checkpoint."""

    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: Optional[float] = None
    grad_clip: float = 1.0
    fused: Optional[bool] = None
    freeze_embeddings: bool = False
    freeze_layers: int = 0


@dataclass
class EmaSection:
    """Teacher momentum m (teacher <- m*teacher + (1-m)*student) per optimizer step: TextJepaConfig's
    ema_* fields. schedule "frozen" never updates the teacher (a fixed random-target baseline);
    schedules.ema_momentum computes each step's value."""

    # TextJepaConfig's ema_<key>, same default (test_recipe checks that they stay equal)
    momentum_start: float = 0.996
    momentum_end: float = 1.0
    schedule: Literal["cosine", "linear", "constant", "frozen"] = "cosine"


@dataclass
class TrainSection:
    """Loop length, batch, precision and checkpoints. batch_size is per process and per micro-batch:
    one optimizer step sees batch_size * grad_accum * num_processes blocks.
    stop_after / max_minutes end this session early (with a checkpoint) without changing the
    schedules, which always run to max_steps; `--resume` continues."""

    output_dir: str = "runs/quickstart"
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 0
    # null: what `accelerate launch` was given (its config file / --mixed_precision, i.e. the
    # ACCELERATE_MIXED_PRECISION it sets; "no" = fp32 without a launcher). "auto": the launcher's too,
    # and without one bf16 where it pays (a CUDA GPU with bf16; a CPU where a sub-second bf16-vs-fp32
    # measurement at startup finds it >= 1.2x faster), else fp32; a resume keeps what the run trained in
    # (loop.resolve_precision). no/bf16/fp16 win over the launcher's, and the run says so in one line
    # when they differ (loop.precision_conflict).
    mixed_precision: Optional[Literal["no", "bf16", "fp16", "auto"]] = None
    cpu: bool = False
    threads: Optional[int] = None
    # true: the trained model's forward (and its backward) through torch.compile (inductor), compiled in
    # place for this run (loop._prepare_model; checkpoints and exports keep the eager keys). Off by default:
    # on the CPU the first step costs 75-115 s of compiling (10-20 s on a warm inductor cache) for 4-12%
    # faster steps, which pays only in long runs at h256 and up (benchmarks/README.md, "torch.compile").
    # The CPU needs a C++ compiler (g++, or $CXX). Not with FSDP.
    compile: bool = False
    save_every: int = 500
    keep_last: int = 2
    overwrite: bool = False  # start from scratch in an output_dir that holds checkpoints (deletes them)
    stop_after: Optional[int] = None
    max_minutes: Optional[float] = None
    export: bool = True
    export_which: Literal["teacher", "student"] = "teacher"
    # unlabeled text (file or glob) to fit whitening on at export: shipped in export/whitening.safetensors
    # and applied by every SentenceEncoder; null ships none ("quickstart": the shipped corpus)
    export_whiten_on: Optional[str] = None
    export_whiten_docs: int = 8800
    # with export_whiten_on: "sif" also ships SIF token weights for the mean pooling (token_weights.safetensors)
    export_token_weights: Literal["sif", "none"] = "none"


@dataclass
class LogSection:
    """Logging and the collapse guard. Every `every` steps: loss, lr, momentum, grad norm, tokens/s,
    target/prediction std. Every `diag_every` steps: RankMe effective rank of mean-pooled teacher
    embeddings on a fixed probe batch of probe_size validation blocks. After guard_after steps
    (null: optim.warmup_steps) a target/prediction std under min_std or a rank under min_rank stops
    the run (after saving a checkpoint); NaN/Inf loss stops it at any step."""

    every: int = 10
    diag_every: int = 50
    probe_size: int = 256
    trackers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    min_std: float = 0.01
    min_rank: float = 2.0
    guard_after: Optional[int] = None
    plot: bool = True
    progress_bar: bool = True
    sanity_check: bool = True  # after export: a quick zero-shot similarity check of the encoder


@dataclass
class Recipe:
    objective: Literal["jepa", "mlm"] = "jepa"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    mask: MaskSection = field(default_factory=MaskSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EmaSection = field(default_factory=EmaSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path) -> None:
        Path(path).write_text("# resolved textjepa recipe (all defaults filled in)\n" + self.to_yaml())


# ---------------------------------------------------------------- typed parsing

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return name + " or null" if len(args) < len(typing.get_args(tp)) else name
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"mapping of {_type_name(key_tp)} to {_type_name(value_tp)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float, numeric strings
    such as YAML's '1e-3' become floats). Raises RecipeError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as err:
                if not str(err).startswith(f"{where}: "):
                    raise  # the container matched and one of its items is wrong: name the item
    elif origin is Literal:
        if isinstance(value, bool) and ("yes" if value else "no") in typing.get_args(tp):
            return "yes" if value else "no"  # YAML 1.1 reads an unquoted no / yes as a boolean
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, value_tp = typing.get_args(tp)
            return {_coerce(k, key_tp, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(where: str, key: str, known: list[str]) -> RecipeError:
    hint = difflib.get_close_matches(key, known, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    prefix = f"{where}: " if where else ""
    return RecipeError(f"{prefix}unknown key {key!r}{did_you_mean}; expected one of {known}")


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a mapping of {known}, got {values!r}")
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise _unknown_key(where, str(key), known)
        tp = hints[key]
        key_where = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, key_where)
        else:
            kwargs[key] = _coerce(value, tp, key_where)
    return cls(**kwargs)


def _validate(recipe: Recipe) -> None:
    """Cross-field checks that types alone cannot express."""
    o = recipe.optim
    if len(o.betas) != 2:
        raise RecipeError(f"optim.betas: expected two numbers, got {o.betas}")
    _check_bounds(recipe)  # the keys without a config of their own against their ranges (BOUNDS)
    _check_through_configs(recipe)  # model.*, ema.* and mask.*: the configs' own checks
    if o.min_lr > o.lr:
        raise RecipeError(f"optim.min_lr: expected at most optim.lr={o.lr:g}, got {o.min_lr:g}")
    e = recipe.ema
    if e.momentum_start > e.momentum_end:
        raise RecipeError(f"ema.momentum_start: expected at most ema.momentum_end={e.momentum_end:g} (the "
                          f"teacher slows down over training), got {e.momentum_start:g}")
    if recipe.data.weights is not None and recipe.data.packed_path:
        raise RecipeError("data.weights: cannot reweight data.packed_path (packed blocks no longer know their "
                          "source file); unset one of them")
    if recipe.data.weights is not None and recipe.data.streaming:
        raise RecipeError("data.weights: not supported with data.streaming yet; unset one of them")
    if recipe.model.init_from and recipe.objective != "jepa":
        raise RecipeError("model.init_from: only objective jepa continues a checkpoint here; for continued MLM use "
                          "transformers' run_mlm.py (benchmarks/adapt.py runs it as a peer)")
    if recipe.data.streaming and recipe.data.packed_path:
        raise RecipeError("data.packed_path: already packed blocks are read from disk, not streamed; set "
                          "data.streaming: false to use them, or data.packed_path: null to stream data.source")


# The numeric keys that no config checks, and their ranges (configuration_textjepa.range_problem words the
# error); a value of null (Optional keys) is not checked. model.*, ema.* and mask.* (but mask.mlm_probability,
# the MLM collator's) are checked by TextJepaConfig and MaskingConfig themselves (_check_through_configs).
BOUNDS = {
    "data.vocab_size": (6, True, None, False), "data.block_size": (2, True, None, False),
    "data.validation_fraction": UNIT_RIGHT_OPEN, "data.num_proc": AT_LEAST_ONE, "data.num_workers": NON_NEGATIVE,
    "data.shuffle_buffer": NON_NEGATIVE, "data.weights": NON_NEGATIVE,  # a mapping: every value
    "mask.mlm_probability": UNIT_OPEN,
    "optim.lr": POSITIVE, "optim.min_lr": NON_NEGATIVE, "optim.warmup_steps": NON_NEGATIVE,
    "optim.betas[0]": UNIT_RIGHT_OPEN, "optim.betas[1]": UNIT_RIGHT_OPEN, "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE, "optim.weight_decay_end": NON_NEGATIVE, "optim.grad_clip": NON_NEGATIVE,
    "optim.freeze_layers": NON_NEGATIVE,
    "train.max_steps": AT_LEAST_ONE, "train.batch_size": AT_LEAST_ONE, "train.grad_accum": AT_LEAST_ONE,
    "train.seed": NON_NEGATIVE, "train.threads": AT_LEAST_ONE, "train.save_every": AT_LEAST_ONE,
    "train.keep_last": AT_LEAST_ONE, "train.export_whiten_docs": AT_LEAST_ONE, "train.stop_after": AT_LEAST_ONE,
    "train.max_minutes": NON_NEGATIVE,
    "log.every": AT_LEAST_ONE, "log.diag_every": AT_LEAST_ONE, "log.probe_size": (2, True, None, False),
    "log.min_std": NON_NEGATIVE, "log.min_rank": NON_NEGATIVE, "log.guard_after": NON_NEGATIVE,
}


def _check_bounds(recipe: Recipe) -> None:
    values = recipe.to_dict()
    for key, bounds in BOUNDS.items():
        section, _, name = key.partition(".")
        name, _, index = name.partition("[")
        value = values[section][name]
        if index and value is not None:
            value = value[int(index.rstrip("]"))]
        items = value.items() if isinstance(value, dict) else [(None, value)]  # a mapping: each of its values
        for item, value in items:
            reason = range_problem(value, bounds) if value is not None else None
            if reason:
                raise RecipeError(f"{key if item is None else f'{key}.{item}'}: {reason}")


def model_config_kwargs(recipe: Recipe) -> dict:
    """TextJepaConfig's keyword arguments from the model and ema sections (build.jepa_config adds the
    tokenizer's): null keeps the config's default, max_position_embeddings defaults to data.block_size."""
    kwargs = {k: v for k, v in dataclasses.asdict(recipe.model).items() if v is not None and k != "init_from"}
    kwargs.setdefault("max_position_embeddings", recipe.data.block_size)
    kwargs.update({EMA_PREFIX + k: v for k, v in dataclasses.asdict(recipe.ema).items()})
    return kwargs


def mask_config_kwargs(recipe: Recipe) -> dict:
    """MaskingConfig's keyword arguments from the mask section (batches.masking_config adds the tokenizer's
    special ids and separator): its MaskingConfig fields, null keeping the config's default."""
    return {k: v for k, v in dataclasses.asdict(recipe.mask).items()
            if k in MaskingConfig.__dataclass_fields__ and v is not None}


def _check_through_configs(recipe: Recipe) -> None:
    """Build the configs that the run will build, so that each check lives in its config; a failed one
    (SettingError, behind huggingface_hub's strict-dataclass error for TextJepaConfig) is reported under the
    recipe's keys: `model.hidden_size: 100 is not divisible by model.num_attention_heads=3`."""
    def model_key(field):
        return f"ema.{field[len(EMA_PREFIX):]}" if field.startswith(EMA_PREFIX) else f"model.{field}"

    mask = mask_config_kwargs(recipe)
    if mask.get("views") == "documents" and (recipe.model.cross_view_loss_weight or 0) > 0:
        raise RecipeError(f"mask.views: 'documents' gives each document one segment, with no partner for "
                          f"model.cross_view_loss_weight={recipe.model.cross_view_loss_weight}; use 'document_halves' "
                          "or set the weight to 0")
    if mask.get("views", "none") != "none":
        mask["separator_token_id"] = 0  # the tokenizer's separator (batches.masking_config); any id stands in
    for build, key in ((lambda: TextJepaConfig(**model_config_kwargs(recipe)), model_key),
                       (lambda: MaskingConfig(**mask), lambda field: f"mask.{field}")):
        try:
            build()
        except Exception as err:  # only a SettingError becomes a RecipeError
            cause = err
            while cause is not None and not isinstance(cause, SettingError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise RecipeError(cause.named(key)) from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`["optim.lr=3e-4", ...]` -> nested dict updates (values parsed as YAML scalars)."""
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text.strip() else None
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def parse_recipe(raw: dict, source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    raw = apply_overrides(dict(raw or {}), overrides or [])
    try:
        recipe = _build(Recipe, raw, "")
        _validate(recipe)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    return recipe


def find_recipe_file(path: str | Path) -> Path:
    """A recipe path as given, else relative to the repository (so `recipes/quickstart.yaml` works from
    any directory of a source checkout), else a bare name like `quickstart`."""
    path = Path(path)
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [path, repo_root / path, repo_root / "recipes" / path, repo_root / "recipes" / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise RecipeError(f"{path}: recipe file not found (also looked in {repo_root / 'recipes'})")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = find_recipe_file(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return parse_recipe(raw, str(path), overrides)
