"""The pretraining objectives of Text-JEPA: each loss term one named part, composed by TextJepaForPreTraining.

LOSS_TERMS is the one list of them, in the order the wrapper sums them: a term's name is the key it has in
the output's loss_terms (what the trainer logs), config.<name>_weight weights it (0 = off), and `shaped_by`
names the other config fields it reads. Every term starts from what the student read (StudentView) and what
the teacher provided; its function is below, its tests in tests/test_concepts.py and tests/test_modeling.py.

  term             function                                          shipped in
  token_loss       token_terms: predictor at the hidden tokens       every jepa recipe
  span_loss        token_terms: the mean of each hidden span          ablation switch (benchmarks/ablations.py)
  bottleneck_loss  bottleneck_loss: pooled vector -> hidden tokens    ablation switch
  context_loss     context_loss: visible tokens -> teacher's there    ablation switch
  sentence_loss    sentence_loss: pooled context -> pooled text       quickstart, adapt
  cross_view_loss  teacher_cross_view_loss / student_cross_view_loss  quickstart, adapt (student: ablation)
  pooled_reg       pooled_regularizer: VICReg / SIGReg / uniformity   ablation switch

Shapes: B batch, K masks per sequence, S segments per sequence, Nc context tokens, Nt target tokens, H hidden.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossTerm:
    name: str  # its key in loss_terms; config.<name>_weight weights it
    shaped_by: tuple[str, ...] = ()  # the other config fields it reads


LOSS_TERMS = (  # in the order TextJepaForPreTraining sums them
    LossTerm("token_loss", ("loss_type", "smooth_l1_beta", "variance_reg_weight", "target_num_layers", "target_norm")),
    LossTerm("span_loss"),
    LossTerm("bottleneck_loss", ("loss_type", "smooth_l1_beta", "variance_reg_weight")),
    LossTerm("context_loss", ("loss_type", "smooth_l1_beta", "variance_reg_weight")),
    LossTerm("sentence_loss", ("pooled_head", "sentence_loss_type", "sentence_temperature")),
    LossTerm("cross_view_loss", ("cross_view_target", "pooled_head")),
    LossTerm("pooled_reg", ("pooled_reg", "sigreg_num_slices", "uniformity_t", "pooled_reg_view",
                                   "pooled_reg_bank", "pooled_reg_bank_source", "pooled_reg_skip_same_document",
                                   "pooled_reg_drift_budget")),
)
LOSS_TERM_NAMES = tuple(term.name for term in LOSS_TERMS)


# ----------------------------------------------------------------------------------------------
# Pieces the terms share
# ----------------------------------------------------------------------------------------------


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


def uniformity_loss(embeddings, t=2.0, bank=None, documents=None, bank_documents=None):
    """Wang & Isola's uniformity of a batch (N, H) on the unit sphere: log of the mean Gaussian potential
    exp(-t ||u - v||^2) over all pairs (lower = spread out). The spreading half of what in-batch negatives
    give SimCSE, without any pair being declared a negative. bank (Q, H), unit vectors held fixed (no
    gradient): its N * Q pairs with the batch join the mean, so each vector is also pushed from them.
    documents (N,) and bank_documents (Q,), long: when given, a pair of two vectors of one document is left
    out of the mean (two pieces of a long document, or the same document met again)."""
    unit = F.normalize(embeddings.float(), dim=-1)
    squared = torch.pdist(unit).pow(2)  # (N (N - 1) / 2,) squared distances within the batch, pairs i < j
    if documents is not None:
        first, second = torch.triu_indices(len(unit), len(unit), 1, device=unit.device)  # pdist's order
        squared = squared[documents[first] != documents[second]]
    if bank is not None and len(bank):  # + (N * Q,) to the bank
        to_bank = (2 - 2 * unit @ bank.float().T).clamp_min(0)  # (N, Q)
        if documents is not None:
            to_bank = to_bank[documents[:, None] != bank_documents[None, :]]  # row-major, as flatten
        squared = torch.cat([squared, to_bank.flatten()])
    if not len(squared):
        return unit.sum() * 0.0
    return squared.mul(-t).exp().mean().log()


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
class StudentView:
    """What the student read of a batch, one row per (sequence, mask): row b*K + k of B*K rows; S segments
    per sequence (1 without segment_ids). Every loss term below starts from it."""

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


# ----------------------------------------------------------------------------------------------
# The terms
# ----------------------------------------------------------------------------------------------


def regression_loss(predictions, targets, config):
    """Regression of predictions onto targets, in float32 (autocast may hand us bf16 predictions):
    config.loss_type, plus the optional VICReg-style hinge (config.variance_reg_weight)."""
    predictions = predictions.float()
    if config.loss_type == "mse":
        loss = F.mse_loss(predictions, targets)
    else:
        loss = F.smooth_l1_loss(predictions, targets, beta=config.smooth_l1_beta)
    if config.variance_reg_weight > 0:
        # VICReg-style hinge: push each prediction dimension's std across tokens up to 1
        std = torch.sqrt(predictions.reshape(-1, predictions.shape[-1]).var(dim=0) + 1e-4)
        loss = loss + config.variance_reg_weight * F.relu(1.0 - std).mean()
    return loss


def token_terms(predictor, student, targets, config):
    """The predictor's estimate of the teacher's states at the hidden positions (B*K, Nt, H), and the terms
    on it: token_loss, and span_loss (the idea of each hidden span: its mean, not its tokens) when weighted."""
    segment_kwargs = {}
    if student.segmented:
        segment_kwargs = dict(context_segments=student.segments, target_segments=student.target_segments)
    predictions = predictor(student.states, student.positions, student.target_positions, student.mask,
                            **segment_kwargs)  # (B*K, Nt, H)
    terms = {"token_loss": regression_loss(predictions, targets, config)}
    if config.span_loss_weight > 0:
        terms["span_loss"] = cosine_distance(span_means(predictions.float(), student.target_idx),
                                             span_means(targets, student.target_idx))
    return predictions, terms


def bottleneck_loss(bottleneck_predictor, student, targets, config):
    """The same targets, seen through each segment's pooled vector alone: a one-layer predictor reads one
    slot per segment (B*K, S, H), at position 0, plus mask tokens at the targets."""
    rows, num_segments = student.has.shape
    slots = torch.arange(num_segments, device=student.has.device).expand(rows, num_segments)
    decoded = bottleneck_predictor(
        student.pooled.to(student.states.dtype), torch.zeros_like(slots), student.target_positions,
        student.has.long(), slots if student.segmented else None,
        student.target_segments if student.segmented else None,
    )
    return regression_loss(decoded, targets, config)


def context_loss(context_predictor, student, context_targets, config):
    """The visible tokens, read without the hidden part (B*K, Nc, H), against the teacher's full read there."""
    return regression_loss(context_predictor(student.states), context_targets, config)


def sentence_loss(head, student, sentence_targets, teacher_has, config):
    """Each segment's pooled visible context -> the teacher's pooled whole segment, where both saw a token.

    config.sentence_loss_type "cosine": 1 - cos to the segment's own target. "infonce": the estimate must pick
    its own target among the teacher's embeddings of every segment in the batch (cosine / sentence_temperature,
    cross-entropy; CPC's contrastive prediction with the teacher's fixed vectors as the candidates). The other
    segments of a packed block are its neighbours in the corpus, so near-duplicates are often among them."""
    own_valid = student.has & teacher_has.repeat_interleave(student.num_masks, dim=0)  # (B*K, S)
    predictions = head(student.pooled)[own_valid]  # (M, H)
    if config.sentence_loss_type == "infonce":
        candidates = sentence_targets[teacher_has]  # (D, H): each segment the teacher saw, once
        index = (teacher_has.reshape(-1).long().cumsum(0) - 1).view_as(teacher_has)  # (B, S): its row in candidates
        labels = index.repeat_interleave(student.num_masks, dim=0)[own_valid]  # (M,)
        logits = F.normalize(predictions.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T  # (M, D)
        if labels.numel() == 0:
            return logits.sum()
        return F.cross_entropy(logits / config.sentence_temperature, labels)
    own_targets = sentence_targets.repeat_interleave(student.num_masks, dim=0)  # (B*K, S, H)
    return cosine_distance(predictions, own_targets[own_valid])


def student_cross_view_loss(head, student, same_document):
    """LeJEPA: partner segments' projections (rows 2i, 2i+1) pulled to their mean; SIGReg keeps them apart.
    Returns the loss and the projections of the segments the student saw (M, H), what the pooled guard tests."""
    num_masks = student.num_masks
    batch = student.has.shape[0] // num_masks
    projections = head(student.pooled[:, 0]).float().view(batch, num_masks, -1)  # (B, K, H)
    seen = student.has[:, 0].view(batch, num_masks)
    pair_valid = same_document[0::2, None] & seen[0::2] & seen[1::2]  # (B/2, K)
    half_gap = (projections[0::2] - projections[1::2]) / 2  # distance of each view to the pair's mean
    loss = half_gap[pair_valid].pow(2).mean(dim=-1).sum() / pair_valid.sum().clamp(min=1)
    return loss, projections[seen]


def teacher_cross_view_loss(head, student, sentence_targets, teacher_has, same_document):
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
    return cosine_distance(head(student.pooled)[pair_valid], partner_targets[pair_valid])


def pooled_regularizer(vectors, config, bank=None, documents=None, bank_documents=None):
    """config.pooled_reg on pooled vectors (M, H): the VICReg hinge + covariance, SIGReg's normality test, or
    the uniformity potential (also against bank (Q, H), when given; without the pairs of one document when
    documents (M,) and bank_documents (Q,) are given)."""
    if config.pooled_reg == "vicreg":
        return vicreg_regularizer(vectors)
    if config.pooled_reg == "uniformity":
        return uniformity_loss(vectors, config.uniformity_t, bank, documents, bank_documents)
    return sigreg_statistic(vectors, config.sigreg_num_slices)
