"""TextJepaConfig: one config for the encoder, the predictor, the JEPA target and loss, and the EMA.

The encoder fields use Hugging Face's usual names so anyone who knows `BertConfig` can read it. A
saved `TextJepaModel` directory carries the whole config (predictor fields included): they are
ignored by the encoder and let a pretraining run be rebuilt from any export.
"""

import math
import re
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


class SettingError(ValueError):
    """A setting that fails its check, raised by the config classes (TextJepaConfig, masking.MaskingConfig).

    field: the setting; reason: what is wrong, naming any other setting it involves as {name}. str() names
    them as the config does ("TextJepaConfig: hidden_size: 100 is not divisible by num_attention_heads=3");
    named(key) spells each setting as the caller knows it (the recipe: "model.hidden_size: ... by
    model.num_attention_heads=3"), so a check lives in its config and every caller reports it in its terms.
    """

    def __init__(self, owner, field, reason):
        self.owner, self.field, self.reason = owner, field, reason
        super().__init__(f"{owner}: {self.named()}")

    def named(self, key=lambda name: name):
        return f"{key(self.field)}: " + re.sub(r"\{(\w+)\}", lambda match: key(match.group(1)), self.reason)

    def __reduce__(self):  # pickles (across processes) with its three arguments
        return type(self), (self.owner, self.field, self.reason)


def range_problem(value, bounds):
    """None when `value` lies in bounds = (low, low_inclusive, high, high_inclusive) (high None: no upper
    bound), else the reason, e.g. "expected a number in (0, 1), got 1.5". NaN and Inf fail every range.
    The one range check of every setting: the configs' fields and the recipe's other keys."""
    low, low_inclusive, high, high_inclusive = bounds
    ok = math.isfinite(value) and (value >= low if low_inclusive else value > low)
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if ok:
        return None
    if high is None:
        expected = f"a number {'>=' if low_inclusive else '>'} {low}"
    else:
        expected = f"a number in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    return f"expected {expected}, got {value}"


# Ranges as (low, low_inclusive, high, high_inclusive); high None = unbounded.
POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = (0, False, None, False), (0, True, None, False), (1, True, None, False)
UNIT_OPEN, UNIT_RIGHT_OPEN, UNIT_CLOSED = (0, False, 1, False), (0, True, 1, False), (0, True, 1, True)
# TextJepaConfig's numeric fields that have a range (validate_architecture checks them, in this order)
RANGES = {
    "hidden_size": AT_LEAST_ONE, "num_hidden_layers": AT_LEAST_ONE, "num_attention_heads": AT_LEAST_ONE,
    "intermediate_size": AT_LEAST_ONE, "max_position_embeddings": AT_LEAST_ONE,
    "hidden_dropout_prob": UNIT_RIGHT_OPEN, "attention_probs_dropout_prob": UNIT_RIGHT_OPEN,
    "predictor_hidden_size": AT_LEAST_ONE, "predictor_num_hidden_layers": AT_LEAST_ONE,
    "predictor_num_attention_heads": AT_LEAST_ONE, "target_num_layers": AT_LEAST_ONE, "smooth_l1_beta": POSITIVE,
    "variance_reg_weight": NON_NEGATIVE, "sentence_loss_weight": NON_NEGATIVE, "token_loss_weight": NON_NEGATIVE,
    "span_loss_weight": NON_NEGATIVE, "cross_view_loss_weight": NON_NEGATIVE, "bottleneck_loss_weight": NON_NEGATIVE,
    "context_loss_weight": NON_NEGATIVE, "pooled_reg_weight": NON_NEGATIVE, "sigreg_num_slices": AT_LEAST_ONE,
    "uniformity_t": POSITIVE, "pooled_reg_bank": NON_NEGATIVE, "pooled_reg_drift_budget": NON_NEGATIVE,
    "sentence_temperature": POSITIVE,
    "ema_momentum_start": UNIT_CLOSED, "ema_momentum_end": UNIT_CLOSED,
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
        sentence_loss_type: "cosine" (default, above) or "infonce": the estimate must pick its own target
            among the teacher's embeddings of every segment in the batch, cross-entropy over cosine /
            sentence_temperature (0.05). The candidates are the teacher's fixed vectors, never the student's.
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
            pushing the batch towards an isotropic Gaussian) or "uniformity" (Wang & Isola: the log mean
            Gaussian potential of the L2-normalised vectors, which spreads them over the sphere as in-batch
            negatives do, with no pair called a negative); "none" (default) or weight 0 = off.
            uniformity_t: the potential's sharpness t in exp(-t ||u - v||^2) (2.0, Wang & Isola's). On the unit
            sphere ||u - v||^2 = 2 - 2cos, so t acts as an inverse temperature 1 / (2t): at 2 every pair weighs
            alike, at 10 the batch's nearest pairs dominate, as in SimCSE's in-batch negatives at 0.05.
            pooled_reg_view: which student vectors the guard reads: "context" (default), the pooled visible
            context of each segment; "full", the student's mean-pooled read of each whole segment, an extra
            student pass over the full sequence: the vectors retrieval embeds, with every detail visible.
            pooled_reg_bank: with "uniformity", how many of the teacher's pooled segment vectors from earlier
            batches the potential also pushes each student vector away from (a first-in first-out queue, a
            persistent buffer, so checkpoints resume it; MoCo's queue). With a frozen teacher these are the
            start's own embeddings of other documents: more, and harder, neighbours than one batch holds.
            0 (default) = the batch alone. Under DDP every process's vectors join the queue (MoCo's all_gather),
            so all processes hold the same queue, and pooled_reg_drift_budget's scale follows the processes'
            mean sentence loss, the same on all of them.
            pooled_reg_bank_source: what the queue holds: "teacher" (default), the teacher's pooled segments as
            above; "student", the guarded student vectors themselves, detached (a memory bank, Wu et al. 2018):
            the queue then moves with the student, so the potential cannot be lowered by moving every vector
            away from fixed ones, only by spreading the student's own vectors apart.
            pooled_reg_skip_same_document: with "uniformity", leave out the pairs of two pieces of one document
            (a document longer than a block is cut into pieces in neighbouring blocks, which can meet in a
            batch or in the queue): they are not two texts to spread apart, and under a sharp potential the
            nearest pair, the one that weighs most, is often such a pair. Needs the collator's document_ids
            (mask.views "documents" or "document_halves" on blocks packed with their "first_document").
            pooled_reg_drift_budget: how far the student may drift from its sentence targets before the guard
            backs off: after each training step the guard's weight is scaled by min(1, scale * exp(budget -
            sentence_loss)), so while the sentence loss (1 - cos to the teacher's, e.g. the frozen start's,
            embedding) stays under the budget the guard keeps its full weight, and while it is over, the
            weight shrinks step by step until the anchor wins again (a persistent buffer, pooled_reg_scale,
            carried by checkpoints and logged). 0 (default) = off: the guard's weight is fixed.
    EMA teacher (a record of the run's recipe; the training loop computes each step's momentum with
    textjepa.training.schedules.ema_momentum and passes it to update_teacher):
        ema_momentum_start -> ema_momentum_end following ema_schedule ("cosine", "linear", "constant",
        or "frozen": never updated).
        pooled_head: the sentence and cross-view heads (sentence_predictor, view_predictor), pooled (N, H) ->
            (N, H). "mlp" (default): a plain two-layer MLP. "residual": x + MLP(x), the MLP's last layer starting
            at zero, so a head's first guess is the student's own pooled context (from a pretrained start that
            guess is already close to the teacher's, so the first gradients carry signal, not a fresh head's
            noise). "identity": no head: the student's pooled vector itself, the exported embedding, must match
            the teacher's; safe only when the teacher cannot collapse with it (ema.schedule frozen, or a
            momentum near 1 over a short run from a pretrained start).
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
    sentence_loss_type: Literal["cosine", "infonce"] = "cosine"
    sentence_temperature: float = 0.05
    token_loss_weight: float = 1.0
    span_loss_weight: float = 0.0
    cross_view_loss_weight: float = 0.0
    cross_view_target: Literal["teacher", "student"] = "teacher"
    bottleneck_loss_weight: float = 0.0
    context_loss_weight: float = 0.0
    pooled_reg: Literal["none", "vicreg", "sigreg", "uniformity"] = "none"
    pooled_reg_weight: float = 0.0
    sigreg_num_slices: int = 256
    uniformity_t: float = 2.0
    pooled_reg_view: Literal["context", "full"] = "context"
    pooled_reg_bank: int = 0
    pooled_reg_bank_source: Literal["teacher", "student"] = "teacher"
    pooled_reg_skip_same_document: bool = False
    pooled_reg_drift_budget: float = 0.0
    pooled_head: Literal["mlp", "residual", "identity"] = "mlp"
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
        """Every field's range (RANGES), then the checks between fields: a typo in a recipe fails here, named,
        instead of as a cryptic error later. Raises SettingError (huggingface_hub's strict dataclass wraps it
        when it runs at init); the recipe turns it into an error that names its own key."""
        for name, bounds in RANGES.items():
            reason = range_problem(getattr(self, name), bounds)
            if reason:
                raise SettingError("TextJepaConfig", name, reason)
        for width, heads in (("hidden_size", "num_attention_heads"),
                             ("predictor_hidden_size", "predictor_num_attention_heads")):
            width_value, heads_value = getattr(self, width), getattr(self, heads)
            if width_value % heads_value:
                raise SettingError("TextJepaConfig", width,
                                   f"{width_value} is not divisible by {{{heads}}}={heads_value}")
            if self.position_embedding_type == "rotary" and (width_value // heads_value) % 2:
                raise SettingError("TextJepaConfig", "position_embedding_type",
                                   f"rotary positions need an even head size; {{{width}}}/{{{heads}}} is odd")
        if self.pooled_reg_view == "full" and self.cross_view_target == "student" and self.cross_view_loss_weight > 0:
            raise SettingError("TextJepaConfig", "pooled_reg_view", "'full' has no effect with {cross_view_target}="
                               "'student' (the guard reads that term's projections); use 'context'")
        if self.pooled_reg_bank and self.pooled_reg != "uniformity":
            raise SettingError("TextJepaConfig", "pooled_reg_bank", "a bank holds vectors for the uniformity "
                               f"potential: it needs {{pooled_reg}}='uniformity', got {self.pooled_reg!r}")
        if self.pooled_reg_bank and self.pooled_reg_bank_source == "teacher" and self.sentence_loss_weight == 0:
            raise SettingError("TextJepaConfig", "pooled_reg_bank", "a bank of the teacher's sentence vectors needs "
                               "{sentence_loss_weight} > 0 (or {pooled_reg_bank_source}='student')")
        if self.pooled_reg_drift_budget and (self.pooled_reg == "none" or self.sentence_loss_weight == 0):
            raise SettingError("TextJepaConfig", "pooled_reg_drift_budget", "the budget backs the guard off when "
                               "the sentence loss exceeds it: it needs {pooled_reg} and {sentence_loss_weight} > 0")
        if self.pooled_reg_skip_same_document and self.pooled_reg != "uniformity":
            raise SettingError("TextJepaConfig", "pooled_reg_skip_same_document", "only the uniformity potential "
                               f"has pairs to leave out; {{pooled_reg}} is {self.pooled_reg!r}")
        if self.target_num_layers > self.num_hidden_layers:
            raise SettingError("TextJepaConfig", "target_num_layers", f"expected at most {{num_hidden_layers}}="
                               f"{self.num_hidden_layers}, got {self.target_num_layers}")


__all__ = ["TextJepaConfig", "SettingError", "range_problem"]
