"""TextJepaConfig: one config for the encoder, the predictor, the JEPA target and loss, and the EMA.

The encoder fields use Hugging Face's usual names so anyone who knows `BertConfig` can read it. A
saved `TextJepaModel` directory carries the whole config (predictor fields included): they are
ignored by the encoder and let a pretraining run be rebuilt from any export.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Keyword arguments that `PreTrainedConfig.__post_init__` itself understands, or that
# `save_pretrained`/`from_pretrained` put into config.json. Anything else is a typo and fails loudly.
_BASE_CONFIG_KWARGS = {
    "name_or_path",
    "attn_implementation",
    "experts_implementation",
    "output_attentions",
    "torch_dtype",
    "num_labels",
    "auto_map",
    "tokenizer_class",
    "custom_pipelines",
    "model_type",
    "transformers_version",
}


@strict
class TextJepaConfig(PreTrainedConfig):
    r"""Configuration of a Text-JEPA model.

    Encoder (student and teacher share it):
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
        hidden_act, max_position_embeddings, hidden_dropout_prob, attention_probs_dropout_prob,
        layer_norm_eps, initializer_range, pad_token_id / bos_token_id / eos_token_id.
        position_embedding_type: "absolute" (learned table) or "rotary" (RoPE on queries and keys).
        norm_placement: "pre" (LayerNorm before each sub-layer plus a final LayerNorm; stable without
            warmup tricks) or "post" (BERT's placement).
    Predictor (narrow transformer that sees the student's context states and mask tokens):
        predictor_hidden_size, predictor_num_hidden_layers, predictor_num_attention_heads,
        predictor_intermediate_size (defaults to 4 x predictor_hidden_size when None).
    Targets (what the teacher's full-sequence pass provides):
        target_num_layers: average of the top-k teacher layers (data2vec); 1 = last layer (I-JEPA).
        target_norm: "layer_norm" (per-token, no affine), "instance_norm" (per-channel over the
            sequence, data2vec), or "none"; applied to each averaged layer and once more to the average.
    Loss:
        loss_type: "smooth_l1" (beta = smooth_l1_beta) or "mse", averaged over target tokens and dims.
        variance_reg_weight: weight of a VICReg-style hinge on the per-dimension std of predictions
            (0 = off, the default; the EMA teacher is what prevents collapse).
        sentence_loss_weight: weight of a sentence-level latent target (1.0, the default; 0 = off): a small MLP
            (sentence_predictor) maps the mean of the student's visible-token states to the teacher's
            mean-pooled embedding of the whole text, scored by cosine distance. The token targets
            alone teach token-level features; this term shapes the pooled vector that search and
            zero-shot similarity use.
        token_loss_weight: weight of the token-level regression above (1.0; 0 skips the predictor's
            token outputs when nothing else reads them).
        span_loss_weight: weight of span concepts (0 = off): per hidden span, the mean of the
            predictor's token outputs estimates the teacher's mean target over that span (the idea of
            the hidden part, not its tokens), scored by cosine distance.
        cross_view_loss_weight: weight of the cross-view target (0 = off; needs the collator's two views
            per block, mask.num_views=2): a second MLP (view_predictor) maps the student's pooled visible
            context of one segment to the teacher's mean-pooled embedding of the *other* segment of the
            same document (rows 2i and 2i+1 are partners; pairs that straddle a document boundary are
            skipped). No negatives: the EMA teacher is the only target.
        cross_view_target: where the cross-view target comes from. "teacher" (default, above). "student"
            (LeJEPA-style, no teacher in the term): view_predictor projects the student's pooled visible
            context of both partner segments, the term is the mean squared distance of each projection to
            the pair's mean (gradients through both), and pooled_reg="sigreg" then tests the projections
            (not the pooled vectors) for normality: the only guard against collapse. With token loss,
            span loss and sentence loss off, the step makes no teacher pass at all (the EMA copy is kept
            for the export only).
        bottleneck_loss_weight: weight of a latent bottleneck (0 = off; a latent-space RetroMAE): a second,
            one-layer predictor (bottleneck_predictor) sees only the student's pooled visible context (one
            vector, at position 0) plus mask tokens at the target positions, and regresses the teacher's
            target states there with the token loss: the pooled vector itself must carry the content.
        context_loss_weight: weight of a loss on the visible tokens too (0 = off; V-JEPA 2.1's context
            loss): a linear head (context_predictor) on the student's states at its visible tokens regresses
            the teacher's targets at the same positions with the token loss. The teacher read the whole
            text, so the student must fold what it cannot see into the states of what it sees (and it is
            those states that mean pooling averages).
        pooled_reg, pooled_reg_weight: a guard on the geometry of the student's pooled context vectors
            (B*K, H): "vicreg" (hinge on each dimension's std up to 1 + squared off-diagonal covariance)
            or "sigreg" (LeJEPA: Epps-Pulley normality test on sigreg_num_slices random 1-D projections,
            pushing the batch towards an isotropic Gaussian); "none" (default) or weight 0 = off.
    EMA teacher (a record of the run's recipe; the training loop computes each step's momentum with
    textjepa.training.schedules.ema_momentum and passes it to update_teacher):
        ema_momentum_start -> ema_momentum_end following ema_schedule ("cosine", "linear", "constant",
        or "frozen": never updated).
    Downstream heads:
        classifier_pooling ("mean" over non-padding tokens, or "cls" = first token), classifier_dropout.
    """

    model_type = "textjepa"

    # encoder
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    position_embedding_type: Literal["absolute", "rotary"] = "absolute"
    rope_theta: float = 10000.0
    norm_placement: Literal["pre", "post"] = "pre"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    # predictor
    predictor_hidden_size: int = 128
    predictor_num_hidden_layers: int = 2
    predictor_num_attention_heads: int = 4
    predictor_intermediate_size: int | None = None
    # targets and loss
    target_num_layers: int = 2
    target_norm: Literal["layer_norm", "instance_norm", "none"] = "layer_norm"
    loss_type: Literal["smooth_l1", "mse"] = "smooth_l1"
    smooth_l1_beta: float = 1.0
    variance_reg_weight: float = 0.0
    sentence_loss_weight: float = 1.0
    token_loss_weight: float = 1.0
    span_loss_weight: float = 0.0
    cross_view_loss_weight: float = 0.0
    cross_view_target: Literal["teacher", "student"] = "teacher"
    bottleneck_loss_weight: float = 0.0
    context_loss_weight: float = 0.0
    pooled_reg: Literal["none", "vicreg", "sigreg"] = "none"
    pooled_reg_weight: float = 0.0
    sigreg_num_slices: int = 256
    # EMA teacher
    ema_momentum_start: float = 0.996
    ema_momentum_end: float = 1.0
    ema_schedule: Literal["cosine", "linear", "constant", "frozen"] = "cosine"
    # heads
    classifier_pooling: Literal["mean", "cls"] = "mean"
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        unknown = sorted(k for k in kwargs if k not in _BASE_CONFIG_KWARGS and not k.startswith("_"))
        if unknown:
            fields = sorted(f for f, spec in self.__dataclass_fields__.items() if spec.init and not f.startswith("_"))
            raise ValueError(
                f"TextJepaConfig: unknown key(s) {unknown}. Expected TextJepaConfig fields: {fields}"
            )
        if self.predictor_intermediate_size is None:
            self.predictor_intermediate_size = 4 * self.predictor_hidden_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Shape and range checks that a typo in a recipe would otherwise turn into a cryptic error."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TextJepaConfig: hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.predictor_hidden_size % self.predictor_num_attention_heads:
            raise ValueError(
                f"TextJepaConfig: predictor_hidden_size ({self.predictor_hidden_size}) must be a multiple of "
                f"predictor_num_attention_heads ({self.predictor_num_attention_heads})"
            )
        if self.position_embedding_type == "rotary":
            for width, heads, name in (
                (self.hidden_size, self.num_attention_heads, "hidden_size"),
                (self.predictor_hidden_size, self.predictor_num_attention_heads, "predictor_hidden_size"),
            ):
                if (width // heads) % 2:
                    raise ValueError(f"TextJepaConfig: rotary positions need an even head size; {name}/heads is odd")
        if not 1 <= self.target_num_layers <= self.num_hidden_layers:
            raise ValueError(
                f"TextJepaConfig: target_num_layers must be in [1, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.target_num_layers}"
            )
        for name in ("token_loss_weight", "span_loss_weight", "cross_view_loss_weight", "sentence_loss_weight",
                     "bottleneck_loss_weight", "context_loss_weight", "pooled_reg_weight", "variance_reg_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TextJepaConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.sigreg_num_slices < 1:
            raise ValueError(f"TextJepaConfig: sigreg_num_slices must be >= 1, got {self.sigreg_num_slices}")
        if not 0.0 <= self.ema_momentum_start <= 1.0 or not 0.0 <= self.ema_momentum_end <= 1.0:
            raise ValueError("TextJepaConfig: ema_momentum_start and ema_momentum_end must lie in [0, 1]")


__all__ = ["TextJepaConfig"]
