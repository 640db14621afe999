"""Text-JEPA encoder: the file copied next to every export (trust_remote_code users) and imported by textjepa.

Read top to bottom:
  TextJepaEmbeddings, rotary helpers, TextJepaAttention, TextJepaLayer   -- building blocks
  TextJepaPreTrainedModel                                                -- init, strict loading
  TextJepaModel                                                          -- the encoder (AutoModel)
  TextJepaForSequenceClassification                                      -- downstream head

This file imports only torch and transformers (plus its configuration twin), so `export_encoder` (auto_map,
on by default) can copy it next to the weights. The predictor, the pretraining wrapper with its EMA teacher
and the objectives live in pretraining.py and objectives.py.

Shapes: B batch, T tokens the encoder reads, H hidden size.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

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
    "TextJepaForSequenceClassification",
    "pool_hidden_states",
]
