"""Text-JEPA models: the encoder, the predictor, the pretraining wrapper with its EMA teacher, and heads.

Read top to bottom:
  TextJepaEmbeddings, rotary helpers, TextJepaAttention, TextJepaLayer   -- building blocks
  TextJepaPreTrainedModel                                                -- init, strict loading
  TextJepaModel                                                          -- the encoder (AutoModel)
  TextJepaPredictor                                                      -- narrow predictor
  TextJepaForPreTraining                                                 -- student + predictor + teacher + loss
  TextJepaForSequenceClassification                                      -- downstream head

This file imports only torch and transformers (plus its configuration twin), so `export_encoder` (auto_map,
on by default) can copy it next to the weights for `trust_remote_code=True` users.

Shapes: B batch, L full sequence length, T tokens the encoder reads (L for the teacher, Nc for the
student), K masks per sequence, Nc context tokens, Nt target tokens, H hidden size, Hp predictor width.
"""

import copy
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.utils import ModelOutput

from .configuration_textjepa import TextJepaConfig


def pool_hidden_states(hidden_states, attention_mask=None, pooling="mean"):
    """(B, T, H) -> (B, H). "mean" averages non-padding tokens; "cls" takes the first token."""
    if pooling == "cls":
        return hidden_states[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # (B, T, 1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class TextJepaEmbeddings(nn.Module):
    """Token embeddings (+ learned absolute positions unless the model is rotary), LayerNorm, dropout.

    Positions come from `position_ids`, never from the index in the tensor: the student reads a
    gathered subset of a sequence and each token must keep the position it had in the full text.
    """

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.position_embedding_type == "absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.position_embeddings = None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids):
        embeddings = self.word_embeddings(input_ids)  # (B, T, H)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class TextJepaRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, computed from position_ids so gathered tokens keep their rotation."""

    def __init__(self, head_dim, theta):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids):
        # position_ids (B, T) -> cos, sin (B, 1, T, head_dim), broadcast over heads
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos()[:, None], angles.sin()[:, None]


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotate(x, cos, sin):
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def select_tokens(x, index, dim=1):
    """The tokens `index` of x along `dim` (the token axis).

    index is a slice (returns a view, e.g. the predictor's trailing target tokens) or a (B, Tq) long
    tensor of positions per row (a gather, e.g. the teacher's target positions). x is (B, T, H) with
    dim=1, or rotary cos/sin (B, 1, T, D) with dim=2.
    """
    if isinstance(index, slice):
        return x[(slice(None),) * dim + (index,)]
    view = [index.shape[0]] + [1] * (dim - 1) + [index.shape[1]] + [1] * (x.dim() - dim - 1)
    size = list(x.shape)
    size[dim] = index.shape[1]
    return x.gather(dim, index.view(view).expand(size))


class TextJepaAttention(nn.Module):
    """Bidirectional multi-head self-attention with one fused QKV projection.

    `attn_implementation` "sdpa" calls torch's scaled_dot_product_attention; "eager" is the same
    math written out (softmax(QK^T/sqrt(d) + mask) V) and must give the same numbers. With
    output_attentions=True the eager math runs (whatever the implementation) and forward returns
    (output, probabilities (B, heads, Tq, T)).
    """

    def __init__(self, config, hidden_size, num_heads):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def forward(self, hidden_states, attention_mask=None, rotary=None, query_index=None, output_attentions=False):
        # hidden_states (B, T, D); attention_mask bool (B, 1, 1, T) or (B, 1, T, T), True = may be attended,
        # or None.
        # query_index (see select_tokens): when only some tokens' outputs are needed, only they ask
        # queries (B, Tq, D) -> output (B, Tq, D); keys and values still come from all T tokens.
        # A (B, 1, T, T) mask (tokens attend within their segment only) loses the rows of absent queries.
        batch, length, width = hidden_states.shape
        if query_index is not None and attention_mask is not None and attention_mask.shape[2] > 1:
            attention_mask = select_tokens(attention_mask, query_index, dim=2)  # (B, 1, Tq, T)
        if query_index is None:
            qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
            query_rotary = rotary
        else:
            # the fused weight's first third projects queries, the rest keys and values (row slices: views)
            query_states = select_tokens(hidden_states, query_index)  # (B, Tq, D)
            query = F.linear(query_states, self.qkv.weight[:width], self.qkv.bias[:width])
            query = query.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, Tq, hd)
            key_value = F.linear(hidden_states, self.qkv.weight[width:], self.qkv.bias[width:])
            key, value = key_value.view(batch, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            query_rotary = None if rotary is None else tuple(select_tokens(r, query_index, dim=2) for r in rotary)
        if rotary is not None:
            query, key = rotate(query, *query_rotary), rotate(key, *rotary)
        dropout = self.dropout_prob if self.training else 0.0
        probs = None
        if self.config._attn_implementation == "eager" or output_attentions:
            scores = torch.matmul(query, key.transpose(-1, -2)) * self.scaling  # (B, heads, T, T)
            if attention_mask is not None:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            context = torch.matmul(probs, value)
        else:
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=self.scaling
            )
        context = context.transpose(1, 2).reshape(batch, query.shape[2], width)
        if output_attentions:
            return self.output(context), probs
        return self.output(context)


class TextJepaLayer(GradientCheckpointingLayer):
    """Transformer block: attention + MLP, each with a residual, LayerNorm pre or post (config)."""

    def __init__(self, config, hidden_size, num_heads, intermediate_size):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.attention = TextJepaAttention(config, hidden_size, num_heads)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.mlp_output = nn.Linear(intermediate_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def mlp(self, x):
        return self.mlp_output(self.activation(self.intermediate(x)))

    def forward(self, hidden_states, attention_mask=None, rotary=None, query_index=None, output_attentions=False):
        # query_index (see select_tokens): compute the outputs of those tokens only, (B, Tq, H); every
        # token still serves as a key/value. Used where only some outputs are read (the teacher's last
        # layer at the target positions, the predictor's last layer at the mask tokens).
        # output_attentions=True returns (hidden_states, attention probabilities (B, heads, Tq, T)).
        residual = hidden_states if query_index is None else select_tokens(hidden_states, query_index)
        attention_input = self.attention_norm(hidden_states) if self.pre_norm else hidden_states
        attended = self.attention(attention_input, attention_mask, rotary, query_index, output_attentions)
        attended, probs = attended if output_attentions else (attended, None)
        if self.pre_norm:
            hidden_states = residual + self.dropout(attended)
            hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        else:
            hidden_states = self.attention_norm(residual + self.dropout(attended))
            hidden_states = self.mlp_norm(hidden_states + self.dropout(self.mlp(hidden_states)))
        return (hidden_states, probs) if output_attentions else hidden_states


def padding_mask_to_attention_mask(attention_mask):
    """(B, T) 1/0 padding mask -> bool (B, 1, 1, T) key mask, or None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None  # the fast path: no mask lets SDPA pick its best kernel
    return attention_mask.bool()[:, None, None, :]


def build_attention_mask(attention_mask=None, segment_ids=None):
    """Padding mask (B, T) and/or segment ids (B, T) -> bool mask for attention, or None.

    With segment_ids, token i may attend to token j only when both carry the same segment id (packed
    documents, or their halves, read as separate texts): (B, 1, T, T). Else (B, 1, 1, T) or None."""
    mask = padding_mask_to_attention_mask(attention_mask)
    if segment_ids is None:
        return mask
    same_segment = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (B, 1, T, T)
    return same_segment if mask is None else same_segment & mask


# ----------------------------------------------------------------------------------------------
# Base class: init and strict loading
# ----------------------------------------------------------------------------------------------


class TextJepaPreTrainedModel(PreTrainedModel):
    config: TextJepaConfig
    config_class = TextJepaConfig
    base_model_prefix = "textjepa"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["TextJepaLayer", "TextJepaEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module):
        # `init.*` skip tensors already loaded from a checkpoint: writing `.data` here would silently
        # re-initialise them (the transformers-5 pitfall).
        super()._init_weights(module)
        if isinstance(module, TextJepaPredictor):
            init.normal_(module.mask_token, mean=0.0, std=self.config.initializer_range)


    # Keys that belong to the encoder: any mismatch there means the checkpoint is not the model the
    # user asked for, and loading must fail instead of leaving random weights in place.
    @staticmethod
    def _is_encoder_key(key):
        key = key.removeprefix(TextJepaPreTrainedModel.base_model_prefix + ".")
        return key.startswith(("embeddings.", "layers.", "final_norm."))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but strict about the encoder's weights.

        Missing or unexpected encoder keys and any shape mismatch raise a ValueError naming the keys.
        Keys outside the encoder may be missing (a new classification head, a new predictor) or
        unexpected (the predictor in a pretraining checkpoint loaded as a plain encoder).
        """
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        problems = []
        missing = [k for k in info.get("missing_keys", []) if model._is_encoder_key(k)]
        unexpected = [k for k in info.get("unexpected_keys", []) if model._is_encoder_key(k)]
        mismatched = list(info.get("mismatched_keys", []))
        if missing:
            problems.append(f"missing encoder weights {sorted(missing)[:10]}")
        if unexpected:
            problems.append(f"unexpected encoder weights {sorted(unexpected)[:10]}")
        if mismatched and not kwargs.get("ignore_mismatched_sizes", False):
            problems.append(f"weights with mismatched shapes {mismatched[:10]}")
        if problems:
            raise ValueError(
                f"{cls.__name__}.from_pretrained({path!r}): the checkpoint does not match the model: "
                + "; ".join(problems)
                + ". Refusing to continue with randomly initialised encoder weights."
            )
        return (model, info) if return_info else model


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------


class TextJepaModel(TextJepaPreTrainedModel):
    """The Text-JEPA encoder (student or teacher). `AutoModel.from_pretrained` returns this.

    forward(input_ids (B, T), attention_mask (B, T) or None, position_ids (B, T) or None) ->
    BaseModelOutput(last_hidden_state (B, T, H), hidden_states: (embeddings, layer 1, ..., layer N)
    with the last entry after the final norm, so hidden_states[-1] == last_hidden_state; with
    output_attentions=True, attentions: one (B, heads, T, T) softmax per layer, computed by the eager
    math whatever the attention implementation).
    Pass a gathered subset of a sequence with its original position_ids to encode only those tokens.
    """

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = TextJepaEmbeddings(config)
        self.rotary = (
            TextJepaRotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
            if config.position_embedding_type == "rotary"
            else None
        )
        self.layers = nn.ModuleList(
            TextJepaLayer(config, config.hidden_size, config.num_attention_heads, config.intermediate_size)
            for _ in range(config.num_hidden_layers)
        )
        # pre-norm leaves the residual stream un-normalised: one final LayerNorm
        self.final_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.norm_placement == "pre"
            else nn.Identity()
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,  # accepted and ignored, so BERT-style tokenizer outputs can be passed as **batch
        output_hidden_states=None,
        return_dict=None,
        query_index=None,
        segment_ids=None,
        output_attentions=None,
        **kwargs,
    ):
        # segment_ids: optional (B, T) ids; a token then attends only to tokens of its own segment.
        # query_index: optional (B, Tq) positions (or a slice) whose final states are all the caller
        # needs; the last layer then computes only those tokens, last_hidden_state (and
        # hidden_states[-1]) is (B, Tq, H) while the earlier hidden_states keep all T tokens.
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        elif position_ids.max() >= self.config.max_position_embeddings and self.rotary is None:
            raise ValueError(
                f"position_ids reach {int(position_ids.max())} but max_position_embeddings is "
                f"{self.config.max_position_embeddings}"
            )
        mask = build_attention_mask(attention_mask, segment_ids)
        rotary = self.rotary(position_ids) if self.rotary is not None else None

        hidden_states = self.embeddings(input_ids, position_ids)  # (B, T, H)
        all_hidden_states = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, mask, rotary, query_index if i == last else None, output_attentions)
            if output_attentions:
                hidden_states, probs = hidden_states
                all_attentions.append(probs)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        hidden_states = self.final_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states
            all_hidden_states = tuple(all_hidden_states)
        all_attentions = tuple(all_attentions) if output_attentions else None
        if not return_dict:
            return tuple(v for v in (hidden_states, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                               attentions=all_attentions)


# ----------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------


class TextJepaPredictor(nn.Module):
    """Narrow transformer: context states + mask tokens at target positions -> target predictions.

    The context states are projected down to the predictor width Hp and given the predictor's own
    position signal; each target position gets the shared learned mask token plus its position.
    Both run through predictor layers with full attention; only the target rows are projected back
    to the encoder width H.
    """

    def __init__(self, config):
        super().__init__()
        width = config.predictor_hidden_size
        self.input_projection = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        if config.position_embedding_type == "absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
            self.rotary = None
        else:
            self.position_embeddings = None
            self.rotary = TextJepaRotaryEmbedding(width // config.predictor_num_attention_heads, config.rope_theta)
        layer_config = copy.copy(config)
        layer_config.norm_placement = "pre"  # the predictor is always pre-norm, closed by one LayerNorm
        self.layers = nn.ModuleList(
            TextJepaLayer(
                layer_config, width, config.predictor_num_attention_heads, config.predictor_intermediate_size
            )
            for _ in range(config.predictor_num_hidden_layers)
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.output_projection = nn.Linear(width, config.hidden_size)

    def forward(self, context_states, context_idx, target_idx, context_attention_mask=None,
                context_segments=None, target_segments=None):
        # context_states (N, Nc, H); context_idx (N, Nc); target_idx (N, Nt) -> predictions (N, Nt, H)
        # context_segments (N, Nc), target_segments (N, Nt): optional segment ids; a mask token then sees
        # only the context (and mask tokens) of its own segment
        num_context = context_idx.shape[1]
        context = self.input_projection(context_states)  # (N, Nc, Hp)
        targets = self.mask_token.to(context.dtype).expand(target_idx.shape[0], target_idx.shape[1], -1)
        positions = torch.cat([context_idx, target_idx], dim=1)  # (N, Nc + Nt)
        hidden_states = torch.cat([context, targets], dim=1)  # (N, Nc + Nt, Hp)
        rotary = None
        if self.position_embeddings is not None:
            hidden_states = hidden_states + self.position_embeddings(positions)
        else:
            rotary = self.rotary(positions)
        keep = None
        if context_attention_mask is not None:
            keep = torch.cat([context_attention_mask, torch.ones_like(target_idx)], dim=1)
        segments = None
        if context_segments is not None:
            segments = torch.cat([context_segments, target_segments], dim=1)  # (N, Nc + Nt)
        mask = build_attention_mask(keep, segments)
        # only the mask tokens' outputs are read: the last layer computes them alone (the context
        # tokens still serve as its keys and values), saving ~Nc/(Nc+Nt) of that layer's work
        targets_only = slice(num_context, None)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, mask, rotary, targets_only if i == last else None)
        if last < 0:  # no predictor layers
            hidden_states = hidden_states[:, targets_only]
        return self.output_projection(self.norm(hidden_states))


# ----------------------------------------------------------------------------------------------
# Pretraining: student + predictor + EMA teacher
# ----------------------------------------------------------------------------------------------


@dataclass
class TextJepaForPreTrainingOutput(ModelOutput):
    """loss (scalar); predictions and targets (B*K, Nt, H); target_std and prediction_std: the mean
    over dimensions of the per-dimension standard deviation across target tokens (detached). A value
    near 0 means every token maps to the same vector: collapse (without a teacher pass, as with
    cross_view_target="student" alone, targets is None and target_std is that of the projections). token_loss and sentence_loss: the
    two main terms of loss (detached; sentence_loss only when config.sentence_loss_weight > 0).
    loss_terms: every term the config turns on, unweighted and detached, by name (token_loss,
    sentence_loss, span_loss, cross_view_loss, bottleneck_loss, pooled_reg): what the trainer logs."""

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    target_std: torch.Tensor | None = None
    prediction_std: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    sentence_loss: torch.Tensor | None = None
    loss_terms: dict | None = None


def normalize_targets(hidden_states, kind):
    """(B, L, H) float32 -> same shape. Parameter-free, so the teacher's targets have no learnable scale."""
    if kind == "layer_norm":
        return F.layer_norm(hidden_states, hidden_states.shape[-1:])
    if kind == "instance_norm":  # each channel normalised over the sequence (data2vec)
        return F.instance_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def per_dimension_std(x):
    """(..., H) -> scalar: std of each dimension across all leading positions, averaged over H."""
    return x.detach().float().reshape(-1, x.shape[-1]).std(dim=0).mean()


def cosine_distance(predictions, targets, weights=None):
    """1 - cosine per row of (N, H) float tensors, averaged (weighted by `weights` (N,) when given).
    No rows (e.g. no cross-view pair in a batch) -> 0, still attached to the graph, never NaN."""
    distance = 1.0 - F.cosine_similarity(predictions.float(), targets.float(), dim=-1)  # (N,)
    if distance.numel() == 0:
        return distance.sum()
    if weights is None:
        return distance.mean()
    weights = weights.to(distance.dtype)
    return (distance * weights).sum() / weights.sum().clamp(min=1.0)


def span_means(values, target_idx):
    """Mean of `values` (N, Nt, H) over each hidden span -> (S, H) for the S spans of all rows.

    target_idx (N, Nt) is sorted per row, so a span is a run of consecutive positions: a new span
    starts wherever the position jumps by more than one (a span that wrapped round the end of the
    sequence counts as two; spans that touch count as one)."""
    rows, num_target, width = values.shape
    starts = torch.ones_like(target_idx, dtype=torch.bool)
    starts[:, 1:] = target_idx[:, 1:] - target_idx[:, :-1] > 1
    span_id = starts.long().cumsum(dim=1) - 1  # (N, Nt), 0-based within each row
    flat_id = (span_id + torch.arange(rows, device=values.device)[:, None] * num_target).reshape(-1)
    sums = values.new_zeros(rows * num_target, width).index_add_(0, flat_id, values.reshape(-1, width))
    counts = torch.zeros(rows * num_target, device=values.device, dtype=values.dtype)
    counts.index_add_(0, flat_id, torch.ones_like(flat_id, dtype=values.dtype))
    used = counts > 0
    return sums[used] / counts[used, None]


def segment_means(states, segment_ids, attention_mask=None, num_segments=None):
    """Mean of states (N, T, H) over the tokens of each segment -> ((N, S, H) means, (N, S) token counts).

    segment_ids (N, T) long; padding (attention_mask 0) is left out; S = num_segments, or
    segment_ids.max() + 1. A segment without tokens gets a zero vector and count 0."""
    rows, length, width = states.shape
    if num_segments is None:
        num_segments = int(segment_ids.max()) + 1
    weights = torch.ones(rows, length, device=states.device, dtype=states.dtype)
    if attention_mask is not None:
        weights = attention_mask.to(states.dtype)
    flat_id = (segment_ids + torch.arange(rows, device=states.device)[:, None] * num_segments).reshape(-1)
    sums = states.new_zeros(rows * num_segments, width)
    sums.index_add_(0, flat_id, (states * weights[..., None]).reshape(-1, width))
    counts = states.new_zeros(rows * num_segments).index_add_(0, flat_id, weights.reshape(-1))
    means = sums / counts.clamp(min=1.0)[:, None]
    return means.view(rows, num_segments, width), counts.view(rows, num_segments)


def vicreg_regularizer(embeddings):
    """VICReg's variance + covariance terms on a batch (N, H): a hinge pushing each dimension's std up
    to 1, plus the squared off-diagonal covariance / H (decorrelated dimensions). Bardes et al. 2022."""
    x = embeddings.float()
    x = x - x.mean(dim=0)
    std = torch.sqrt(x.var(dim=0) + 1e-4)
    variance = F.relu(1.0 - std).mean()
    cov = (x.T @ x) / max(x.shape[0] - 1, 1)  # (H, H)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return variance + off_diagonal.pow(2).sum() / x.shape[1]


def uniformity_loss(embeddings, t=2.0):
    """Wang & Isola's uniformity of a batch (N, H) on the unit sphere: log of the mean Gaussian potential
    exp(-t ||u - v||^2) over all pairs (lower = spread out). The spreading half of what in-batch negatives
    give SimCSE, without any pair being declared a negative."""
    unit = F.normalize(embeddings.float(), dim=-1)
    if unit.shape[0] < 2:
        return unit.sum() * 0.0
    return torch.pdist(unit).pow(2).mul(-t).exp().mean().log()


def sigreg_statistic(embeddings, num_slices=256, t_max=3.0, num_points=17, generator=None):
    """SIGReg (LeJEPA, Balestriero & LeCun 2025): how far a batch (N, H) is from an isotropic Gaussian.

    The batch is projected on num_slices random unit directions; each 1-D projection x (N,) gets the
    Epps-Pulley statistic  integral over t of |mean_n exp(i t x_n) - exp(-t^2/2)|^2 exp(-t^2/2) dt
    (the empirical characteristic function against N(0, 1)'s), integrated by the trapezoid rule on
    [0, t_max] (the integrand is even in t). Returns the mean over slices. It is not multiplied by N,
    so a weight does not depend on the batch size: ~1/N for Gaussian samples, O(1) for collapsed ones.
    """
    x = embeddings.float()
    directions = torch.randn(x.shape[1], num_slices, device=x.device, generator=generator)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected = x @ directions  # (N, slices)
    t = torch.linspace(0.0, t_max, num_points, device=x.device)
    gaussian_cf = torch.exp(-0.5 * t**2)  # (P,)
    weights = torch.full((num_points,), 2 * t_max / (num_points - 1), device=x.device)
    weights[[0, -1]] /= 2
    angles = projected.unsqueeze(-1) * t  # (N, slices, P)
    error = (angles.cos().mean(dim=0) - gaussian_cf) ** 2 + angles.sin().mean(dim=0) ** 2  # (slices, P)
    return (error @ (weights * gaussian_cf)).mean()


class ResidualPooledHead(nn.Module):
    """x + MLP(x) for pooled vectors (N, H), the MLP's last layer zero at init (config.pooled_head "residual")."""

    def __init__(self, hidden_size, width):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, hidden_size))

    def forward(self, pooled):
        return pooled + self.mlp(pooled)


def pooled_head(config):
    """The small MLP of the sentence-level targets: a pooled vector (N, H) -> an estimate (N, H)."""
    width = config.predictor_intermediate_size
    if config.pooled_head == "identity":
        return nn.Identity()
    if config.pooled_head == "residual":
        return ResidualPooledHead(config.hidden_size, width)
    return nn.Sequential(nn.Linear(config.hidden_size, width), nn.GELU(), nn.Linear(width, config.hidden_size))


@dataclass
class _StudentView:
    """What the student read of a batch, one row per (sequence, mask): row b*K + k of B*K rows; S segments
    per sequence (1 without segment_ids). The loss terms of TextJepaForPreTraining all start from it."""

    states: torch.Tensor  # (B*K, Nc, H) the student's last hidden states at its visible tokens
    mask: torch.Tensor | None  # (B*K, Nc) the padding mask there, or None
    positions: torch.Tensor  # (B*K, Nc) the visible tokens' positions (in their segment)
    segments: torch.Tensor  # (B*K, Nc) their segment ids (all 0 without segment_ids)
    target_idx: torch.Tensor  # (B*K, Nt) the hidden tokens' indices in the sequence
    target_positions: torch.Tensor  # (B*K, Nt)
    target_segments: torch.Tensor  # (B*K, Nt)
    pooled: torch.Tensor  # (B*K, S, H) the mean of the visible states of each segment
    has: torch.Tensor  # (B*K, S) bool: the row saw a token of that segment
    num_masks: int  # K
    segmented: bool  # segment_ids were given: attention, prediction and pooling stay within a segment


class TextJepaForPreTraining(TextJepaPreTrainedModel):
    """Student encoder (`self.textjepa`), predictor, and an EMA teacher that is deliberately *not* a
    registered submodule: it has no gradients, stays out of `parameters()`/`state_dict()` (so DDP and
    FSDP never wrap it and `save_pretrained` cannot mix it up with the student), and is created as a
    copy of the student the first time it is needed. Under FSDP touch `model.teacher` before wrapping
    (the trainer does): a copy of the sharded student is not a plain encoder.
    Checkpoints carry it through `teacher_state_dict()` / `load_teacher_state_dict()`.
    """

    def __init__(self, config):
        super().__init__(config)
        self.textjepa = TextJepaModel(config)
        self.predictor = TextJepaPredictor(config)
        # pooled student context (N, H) -> the teacher's pooled embedding of the same segment / of its partner
        self.sentence_predictor = pooled_head(config) if config.sentence_loss_weight > 0 else None
        self.view_predictor = pooled_head(config) if config.cross_view_loss_weight > 0 else None
        if config.bottleneck_loss_weight > 0:
            # one pooled vector + mask tokens -> the teacher's states at the targets (a one-layer decoder)
            bottleneck_config = copy.copy(config)
            bottleneck_config.predictor_num_hidden_layers = 1
            self.bottleneck_predictor = TextJepaPredictor(bottleneck_config)
        else:
            self.bottleneck_predictor = None
        # the student's states at its visible tokens (N, H) -> the teacher's targets at the same positions
        hidden = config.hidden_size
        self.context_predictor = nn.Linear(hidden, hidden) if config.context_loss_weight > 0 else None
        self.post_init()
        with torch.no_grad():  # residual pooled heads start as the identity (weights loaded later replace this)
            for head in (self.sentence_predictor, self.view_predictor):
                if isinstance(head, ResidualPooledHead):
                    head.mlp[-1].weight.zero_()
                    head.mlp[-1].bias.zero_()
        object.__setattr__(self, "_teacher", None)  # bypass nn.Module registration on purpose

    # -- teacher ---------------------------------------------------------------------------------
    @property
    def teacher(self):
        if self._teacher is None:
            if any(hasattr(p, "full_tensor") for p in self.textjepa.parameters()):
                raise RuntimeError("the EMA teacher must be created from the full student, before FSDP shards it: "
                                   "touch `model.teacher` before accelerator.prepare(model)")
            teacher = copy.deepcopy(self.textjepa).float().eval()
            teacher.requires_grad_(False)
            object.__setattr__(self, "_teacher", teacher)
        return self._teacher

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda() reach the unregistered teacher too
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode=True):
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()  # the teacher never uses dropout
        return self

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- momentum * teacher + (1 - momentum) * student, one fused foreach op.

        Call once per optimizer step (on `accelerator.sync_gradients`), on the unwrapped model, on
        every process. Under FSDP2 (`fully_shard`) the student's parameters are DTensor shards while
        the teacher is a full copy on every process: each parameter is all-gathered in turn
        (`full_tensor()`, a collective, hence every process) and the teacher moves towards it, so
        the teachers stay identical across processes and the peak extra memory is one parameter.
        """
        if momentum >= 1.0:
            return
        teacher_params = list(self.teacher.parameters())
        student_params = list(self.textjepa.parameters())
        if any(hasattr(p, "full_tensor") for p in student_params):  # DTensor shards (FSDP2)
            for teacher_param, student_param in zip(teacher_params, student_params):
                full = student_param.detach().full_tensor() if hasattr(student_param, "full_tensor") else student_param
                teacher_param.lerp_(full.to(teacher_param.dtype), 1.0 - momentum)
        else:
            student_params = [p.detach().to(t.dtype) for p, t in zip(student_params, teacher_params)]
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
        for teacher_buffer, student_buffer in zip(self.teacher.buffers(), self.textjepa.buffers()):
            teacher_buffer.copy_(student_buffer)

    def teacher_state_dict(self):
        return self.teacher.state_dict()

    def load_teacher_state_dict(self, state_dict):
        self.teacher.load_state_dict(state_dict, strict=True)

    def export_encoder(self, save_directory, which="teacher", auto_map=True, **save_kwargs):
        """Save the teacher (default) or student as a plain `TextJepaModel` directory (safetensors).

        With auto_map=True (the default) config.json names the classes and the configuration/modeling
        files are copied beside the weights, so `AutoModel` / `AutoModelForSequenceClassification
        .from_pretrained(dir, trust_remote_code=True)` work without textjepa installed.
        """
        if which not in ("teacher", "student"):
            raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
        # a shallow module copy with its own config: the student shares self.config, which must not
        # pick up the export's architectures/auto_map
        encoder = copy.copy(self.teacher if which == "teacher" else self.textjepa)
        encoder.config = copy.deepcopy(encoder.config)
        encoder.config.architectures = ["TextJepaModel"]
        if auto_map:
            encoder.config.auto_map = {
                "AutoConfig": "configuration_textjepa.TextJepaConfig",
                "AutoModel": "modeling_textjepa.TextJepaModel",
                "AutoModelForSequenceClassification": "modeling_textjepa.TextJepaForSequenceClassification",
            }
        encoder.save_pretrained(save_directory, **save_kwargs)
        if auto_map:
            here = os.path.dirname(os.path.abspath(__file__))
            for name in ("configuration_textjepa.py", "modeling_textjepa.py"):
                shutil.copyfile(os.path.join(here, name), os.path.join(save_directory, name))
        return save_directory

    # -- forward ---------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_targets(self, input_ids, attention_mask=None, target_idx=None, return_sentence=False,
                        segment_ids=None, position_ids=None):
        """Teacher pass over the full sequence: (B, L) -> normalised targets (B, L, H), float32.

        With target_idx (B, N) positions, returns only those tokens' targets (B, N, H), the same
        numbers as compute_targets(input_ids)[rows, target_idx], cheaper: per-token target norms
        ("layer_norm", "none") commute with the gather, so the teacher's last layer computes only the
        target tokens and the norms run on them alone. "instance_norm" needs every token's state.

        return_sentence=True also returns the teacher's sentence embeddings, float32: the mean of its
        last hidden states over non-padding tokens, i.e. what the exported encoder's mean pooling gives,
        (B, 1, H); with segment_ids (B, L) one per segment, (B, S, H) for S = segment_ids.max() + 1 (an
        absent segment's row is 0). It needs every token's last layer, so the last-layer shortcut is off.
        segment_ids also keep attention within each segment; position_ids (B, L) default to 0..L-1.
        """
        kind = self.config.target_norm
        per_token = kind != "instance_norm"
        query_index = None
        if target_idx is not None and per_token and target_idx.shape[1] < input_ids.shape[1] and not return_sentence:
            query_index = target_idx
        outputs = self.teacher(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True,
            query_index=query_index, segment_ids=segment_ids,
        )
        layers = list(outputs.hidden_states[-self.config.target_num_layers :])
        if target_idx is not None and per_token:  # gather first, normalise the N tokens only
            layers = [h if query_index is not None and i == len(layers) - 1 else select_tokens(h, target_idx)
                      for i, h in enumerate(layers)]
        if len(layers) == 1:
            targets = normalize_targets(layers[0].float(), kind)
        else:
            averaged = sum(normalize_targets(h.float(), kind) for h in layers) / len(layers)
            targets = normalize_targets(averaged, kind)
        if target_idx is not None and not per_token:
            targets = select_tokens(targets, target_idx)
        if return_sentence:
            segments = segment_ids if segment_ids is not None else torch.zeros_like(input_ids)
            sentence, _ = segment_means(outputs.last_hidden_state.float(), segments, attention_mask)  # (B, S, H)
            return targets, sentence
        return targets

    def forward(self, input_ids, context_idx, target_idx, attention_mask=None, segment_ids=None,
                position_ids=None, same_document=None, return_dict=None, **kwargs):
        # input_ids (B, L); context_idx (B, K, Nc); target_idx (B, K, Nt). From the collator's views:
        #   segment_ids, position_ids (B, L) (masking.views="document_halves"): S segments per row, each
        #     read as a text of its own (attention within it, positions from 0); segments 2d and 2d+1 are
        #     the two halves of one document piece, partners for the cross-view target;
        #   same_document (B,) bool (masking.num_views): rows 2i and 2i+1 are neighbouring segments of one
        #     block and partners when they come from one document.
        # Steps: 1. the teacher reads the whole sequence, 2. the student reads the visible tokens, 3.-5. the
        # loss terms compare the two, and the loss is their weighted sum (in the order they are computed).
        if context_idx.dim() == 2:  # one mask per sequence
            context_idx, target_idx = context_idx[:, None], target_idx[:, None]
        use = self._parts_in_use(segment_ids, same_document)
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        segments = segment_ids if segment_ids is not None else torch.zeros_like(input_ids)  # (B, L)

        # 1. teacher: one full-sequence pass shared by the K masks; skipped when no term reads it
        targets = context_targets = sentence_targets = None
        if use["teacher"]:
            targets, context_targets, sentence_targets = self._teacher_targets(
                input_ids, attention_mask, context_idx, target_idx, segment_ids, position_ids,
                with_context=use["context"], with_sentence=use["sentence"])
        num_segments = int(segments.max()) + 1
        teacher_has = torch.zeros(batch, num_segments, dtype=torch.bool, device=input_ids.device)  # (B, S)
        teacher_has.scatter_(1, segments, True if attention_mask is None else attention_mask.bool())

        # 2. student: only the visible tokens, keeping their positions (and segments)
        student = self._read_context(input_ids, attention_mask, position_ids, segments, context_idx, target_idx,
                                     segmented=segment_ids is not None, num_segments=num_segments)

        # 3. token level: the predictor at the hidden positions, the pooled bottleneck, the visible tokens
        terms, predictions, projections = {}, None, None  # terms: unweighted, by name, in the order they are summed
        if use["tokens"]:
            predictions, token_terms = self._token_terms(student, targets)
            terms.update(token_terms)
        if self.bottleneck_predictor is not None:
            terms["bottleneck_loss"] = self._bottleneck_loss(student, targets)
        if use["context"]:  # the visible tokens, read without the hidden part, against the teacher's full read
            terms["context_loss"] = self.compute_loss(self.context_predictor(student.states), context_targets)
        # 4. sentence level: from the pooled visible context of each segment
        if self.sentence_predictor is not None:
            terms["sentence_loss"] = self._sentence_loss(student, sentence_targets, teacher_has)
        if use["student_views"]:
            terms["cross_view_loss"], projections = self._student_cross_view_loss(student, same_document)
        elif use["cross_view"]:
            terms["cross_view_loss"] = self._teacher_cross_view_loss(student, sentence_targets, teacher_has,
                                                                     same_document)
        # 5. optional guard on the geometry of the pooled student vectors (the segments it saw), or of
        #    their projections in the teacher-free cross-view term
        if self.config.pooled_reg != "none" and self.config.pooled_reg_weight > 0:
            guarded = projections if projections is not None else student.pooled[student.has]  # (M, H)
            terms["pooled_reg"] = self._pooled_regularizer(guarded)
        return self._weighted_output(terms, predictions, targets, projections, student)

    def _parts_in_use(self, segment_ids, same_document):
        """Which terms and passes this batch needs: the config's weights, and the views the collator sent."""
        config = self.config
        cross_view = self.view_predictor is not None and (same_document is not None or segment_ids is not None)
        student_views = cross_view and config.cross_view_target == "student"  # LeJEPA-style, no teacher
        if student_views and segment_ids is not None:
            raise ValueError("cross_view_target='student' works on mask.num_views segments, not mask.views")
        tokens = config.token_loss_weight > 0 or config.span_loss_weight > 0
        sentence = self.sentence_predictor is not None or (cross_view and not student_views)  # the teacher's pooled
        context = self.context_predictor is not None
        teacher = tokens or sentence or self.bottleneck_predictor is not None or context
        return {"cross_view": cross_view, "student_views": student_views, "tokens": tokens, "sentence": sentence,
                "context": context, "teacher": teacher}

    def _teacher_targets(self, input_ids, attention_mask, context_idx, target_idx, segment_ids, position_ids,
                         with_context, with_sentence):
        """One teacher pass over the full sequences (B, L) for all K masks. Returns its targets at the hidden
        positions (B*K, Nt, H), row b*K + k; at the visible positions (B*K, Nc, H) when with_context (else
        None); and its mean-pooled embedding of every segment (B, S, H) when with_sentence (else None)."""
        batch, num_masks, num_target = target_idx.shape
        num_context = context_idx.shape[2]
        wanted = target_idx.reshape(batch, num_masks * num_target)
        if with_context:  # the visible tokens' targets too, after the hidden ones: (B, K*Nt + K*Nc)
            wanted = torch.cat([wanted, context_idx.reshape(batch, num_masks * num_context)], dim=1)
        targets = self.compute_targets(
            input_ids, attention_mask, wanted,
            return_sentence=with_sentence, segment_ids=segment_ids, position_ids=position_ids,
        )
        context_targets = sentence_targets = None
        if with_sentence:
            targets, sentence_targets = targets
        if with_context:
            context_targets = targets[:, num_masks * num_target:].reshape(batch * num_masks, num_context, -1)
            targets = targets[:, :num_masks * num_target]
        return targets.reshape(batch * num_masks, num_target, -1), context_targets, sentence_targets

    def _read_context(self, input_ids, attention_mask, position_ids, segments, context_idx, target_idx, segmented,
                      num_segments):
        """The student's pass over the visible tokens of each (sequence, mask): a _StudentView of B*K rows."""
        batch, num_masks, num_context = context_idx.shape
        rows = batch * num_masks
        context_idx = context_idx.reshape(rows, num_context)
        target_idx = target_idx.reshape(rows, target_idx.shape[2])
        row_to_sequence = torch.arange(batch, device=input_ids.device).repeat_interleave(num_masks)[:, None]
        context_ids = input_ids[row_to_sequence, context_idx]  # (B*K, Nc)
        context_mask = attention_mask[row_to_sequence, context_idx] if attention_mask is not None else None
        context_positions = position_ids[row_to_sequence, context_idx]
        context_segments = segments[row_to_sequence, context_idx]  # (B*K, Nc)
        target_positions = position_ids[row_to_sequence, target_idx]
        target_segments = segments[row_to_sequence, target_idx]  # (B*K, Nt)
        states = self.textjepa(
            context_ids, attention_mask=context_mask, position_ids=context_positions,
            segment_ids=context_segments if segmented else None,
        ).last_hidden_state  # (B*K, Nc, H)
        # the student's idea of each segment from what it sees: (B*K, S, H), and which segments it saw
        pooled, counts = segment_means(states, context_segments, context_mask, num_segments)
        return _StudentView(states, context_mask, context_positions, context_segments, target_idx, target_positions,
                            target_segments, pooled, counts > 0, num_masks, segmented)

    def _token_terms(self, student, targets):
        """The predictor's estimate of the teacher's states at the hidden positions (B*K, Nt, H), and the terms
        on it: the token loss, and the span loss (the idea of each hidden span: its mean, not its tokens)."""
        segment_kwargs = {}
        if student.segmented:
            segment_kwargs = dict(context_segments=student.segments, target_segments=student.target_segments)
        predictions = self.predictor(student.states, student.positions, student.target_positions, student.mask,
                                     **segment_kwargs)  # (B*K, Nt, H)
        terms = {"token_loss": self.compute_loss(predictions, targets)}
        if self.config.span_loss_weight > 0:
            terms["span_loss"] = cosine_distance(span_means(predictions.float(), student.target_idx),
                                                 span_means(targets, student.target_idx))
        return predictions, terms

    def _bottleneck_loss(self, student, targets):
        """The same targets, seen through each segment's pooled vector alone: a one-layer predictor reads one
        slot per segment (B*K, S, H), at position 0, plus mask tokens at the targets."""
        rows, num_segments = student.has.shape
        slots = torch.arange(num_segments, device=student.has.device).expand(rows, num_segments)
        decoded = self.bottleneck_predictor(
            student.pooled.to(student.states.dtype), torch.zeros_like(slots), student.target_positions,
            student.has.long(), slots if student.segmented else None,
            student.target_segments if student.segmented else None,
        )
        return self.compute_loss(decoded, targets)

    def _sentence_loss(self, student, sentence_targets, teacher_has):
        """Each segment's pooled visible context -> the teacher's pooled whole segment, where both saw a token."""
        own_targets = sentence_targets.repeat_interleave(student.num_masks, dim=0)  # (B*K, S, H)
        own_valid = student.has & teacher_has.repeat_interleave(student.num_masks, dim=0)
        return cosine_distance(self.sentence_predictor(student.pooled)[own_valid], own_targets[own_valid])

    def _student_cross_view_loss(self, student, same_document):
        """LeJEPA: partner segments' projections (rows 2i, 2i+1) pulled to their mean; SIGReg keeps them apart.
        Returns the loss and the projections of the segments the student saw (M, H), what the pooled guard tests."""
        num_masks = student.num_masks
        batch = student.has.shape[0] // num_masks
        projections = self.view_predictor(student.pooled[:, 0]).float().view(batch, num_masks, -1)  # (B, K, H)
        seen = student.has[:, 0].view(batch, num_masks)
        pair_valid = same_document[0::2, None] & seen[0::2] & seen[1::2]  # (B/2, K)
        half_gap = (projections[0::2] - projections[1::2]) / 2  # distance of each view to the pair's mean
        loss = half_gap[pair_valid].pow(2).mean(dim=-1).sum() / pair_valid.sum().clamp(min=1)
        return loss, projections[seen]

    def _teacher_cross_view_loss(self, student, sentence_targets, teacher_has, same_document):
        """Each segment's pooled visible context -> the teacher's pooled embedding of its partner segment (same
        document): segment s <-> s ^ 1 of the same row with segment_ids, else row 2i <-> 2i+1."""
        batch, num_segments = teacher_has.shape
        device = teacher_has.device
        if student.segmented:
            partner = torch.arange(num_segments, device=device) ^ 1
            partner = partner.clamp(max=num_segments - 1)  # an odd last segment has no partner
            partner_targets, partner_valid = sentence_targets[:, partner], teacher_has[:, partner]
            partner_valid = partner_valid & (partner != torch.arange(num_segments, device=device))
        else:
            if batch % 2:
                raise ValueError(f"cross-view targets need pairs of segments; got an odd batch of {batch} rows")
            partner = torch.arange(batch, device=device) ^ 1
            partner_targets = sentence_targets[partner]
            partner_valid = teacher_has[partner] & same_document[:, None]
        partner_targets = partner_targets.repeat_interleave(student.num_masks, dim=0)  # (B*K, S, H)
        pair_valid = student.has & partner_valid.repeat_interleave(student.num_masks, dim=0)
        return cosine_distance(self.view_predictor(student.pooled)[pair_valid], partner_targets[pair_valid])

    def _pooled_regularizer(self, vectors):
        """config.pooled_reg on pooled vectors (M, H): the VICReg hinge + covariance, or SIGReg's normality test."""
        if self.config.pooled_reg == "vicreg":
            return vicreg_regularizer(vectors)
        if self.config.pooled_reg == "uniformity":
            return uniformity_loss(vectors)
        return sigreg_statistic(vectors, self.config.sigreg_num_slices)

    def _weighted_output(self, terms, predictions, targets, projections, student):
        """The loss: each term times its config.<name>_weight, summed in the order of `terms`."""
        if not terms:
            raise ValueError("TextJepaForPreTraining: every loss term is off (set token_loss_weight, span_loss_weight, "
                             "sentence_loss_weight, cross_view_loss_weight, bottleneck_loss_weight or "
                             "context_loss_weight > 0)")
        reference = predictions if predictions is not None else student.pooled[student.has]
        return TextJepaForPreTrainingOutput(
            loss=sum(getattr(self.config, f"{name}_weight") * value for name, value in terms.items()),
            predictions=predictions,
            targets=targets,
            target_std=per_dimension_std(targets if targets is not None else projections),
            prediction_std=per_dimension_std(reference),
            token_loss=terms["token_loss"].detach() if "token_loss" in terms else None,
            sentence_loss=terms["sentence_loss"].detach() if "sentence_loss" in terms else None,
            loss_terms={name: value.detach() for name, value in terms.items()},
        )

    def compute_loss(self, predictions, targets):
        """Regression of predictions onto targets, in float32 (autocast may hand us bf16 predictions)."""
        predictions = predictions.float()
        if self.config.loss_type == "mse":
            loss = F.mse_loss(predictions, targets)
        else:
            loss = F.smooth_l1_loss(predictions, targets, beta=self.config.smooth_l1_beta)
        if self.config.variance_reg_weight > 0:
            # VICReg-style hinge: push each prediction dimension's std across tokens up to 1
            std = torch.sqrt(predictions.reshape(-1, predictions.shape[-1]).var(dim=0) + 1e-4)
            loss = loss + self.config.variance_reg_weight * F.relu(1.0 - std).mean()
        return loss


# ----------------------------------------------------------------------------------------------
# Downstream head
# ----------------------------------------------------------------------------------------------


class TextJepaForSequenceClassification(TextJepaPreTrainedModel):
    """Pooled encoder (config.classifier_pooling: "mean" or "cls") + dropout + linear head.

    Loss follows HF's heads: regression (MSE) when num_labels == 1, cross-entropy for single-label
    integer labels, BCE-with-logits for multi-label float labels.
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.textjepa = TextJepaModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None, labels=None, return_dict=None, **kwargs
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states = self.textjepa(input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        pooled = pool_hidden_states(hidden_states, attention_mask, self.config.classifier_pooling)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)

        loss = None
        if labels is not None:
            problem_type = self.config.problem_type
            if problem_type is None:
                if self.num_labels == 1:
                    problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem_type = "single_label_classification"
                else:
                    problem_type = "multi_label_classification"
            if problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
            elif problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        if not return_dict:
            return (loss, logits) if loss is not None else (logits,)
        return SequenceClassifierOutput(loss=loss, logits=logits)


__all__ = [
    "TextJepaPreTrainedModel",
    "TextJepaModel",
    "TextJepaPredictor",
    "TextJepaForPreTraining",
    "TextJepaForPreTrainingOutput",
    "TextJepaForSequenceClassification",
    "pool_hidden_states",
]
