"""Span masking: which tokens the student sees (context) and which it must predict (targets).

All mask logic of the project lives here. For a batch of B sequences of length L and K masks per
sequence, every one of the B*K rows gets its own independent sample, with exact counts:

    Nt = round(target_ratio * L)                  target positions per row
    Nd = round(extra_context_drop * L)            extra positions hidden from the student
    Nc = L - Nt - Nd                              context positions per row

so the index tensors are rectangular without truncating anyone to the batch's shortest mask.

How a row is sampled (vectorised over rows with numpy, no per-sample Python loop):
  1. M spans per row (num_spans, or round(Nt / mean_span_length) when mean_span_length is set) with
     lengths >= min_span_length summing to exactly Nt; the distribution (uniform / geometric / poisson)
     shapes how the Nt - M*min_span_length tokens above the minimum are shared between the spans.
  2. The L - Nt non-target tokens are cut into M+1 random gaps (gap 0 allowed), which places the
     spans left to right without overlapping each other.
  3. The row is rotated by a uniform random offset (spans running off the end wrap to the start).
     This makes P(position i is a target) = Nt/L for every i, first and last included (I-JEPA's
     sampler never picks the last position; a plain "uniform start" sampler under-samples both ends).
  4. Positions holding special_token_ids are removed from the targets and the same number of
     positions is added back, preferring neighbours of the existing spans. A row with fewer than Nt
     other positions (a block of text outside the vocabulary is mostly [UNK], a special token) takes
     the shortfall from its special positions, so the counts stay exact and the run goes on.
  5. Context = complement of the targets, minus Nd uniformly random extra drops. With
     allow_overlap=True the context is instead the complement of an independent span mask (+ drops),
     so it may contain target positions.
  6. Sorted indices come from np.nonzero on the boolean (B*K, L) masks (row-major, so ascending).

Views (num_views=V, an even number, for the cross-view target): each block of L tokens is cut into V
segments of L/V tokens, which become rows of their own (row b*V + v = segment v of block b; each
segment keeps positions 0..L/V-1, like a text read on its own), and each row is masked as above.
Neighbouring segments 2j and 2j+1 are partners. The batch then carries same_document (B*V,) bool: True
when no separator_token_id (the packer's document separator) lies strictly inside the pair's 2L/V
tokens, i.e. both segments come from one document and may serve as each other's cross-view target.

Document halves (views="document_halves", the cross-view target on packed data): a packed block holds
several documents joined by separator_token_id (a separator belongs to the document it ends). Every
document piece in the block is cut at its middle into two segments, and the batch carries
segment_ids (B, L) long: 2d for the first half of the block's d-th document piece, 2d+1 for its second
half; and position_ids (B, L) long, counting from 0 at the start of each segment (each segment is read
like a text on its own, as the encoder will read sentences later). The model lets a token attend only within its segment (student, teacher and predictor), pools
each segment on its own, and pairs segment 2d with 2d+1 for the cross-view target. Masks are sampled
over the block as usual. Unlike num_views, every document contributes pairs, however short.
Documents (views="documents"): the same, without the cut: segment d is the block's d-th document piece,
read on its own (attention and positions within it), so the teacher's pooled embedding of a segment is
its embedding of that whole document, the one the exported encoder gives it; no partners (no cross-view).
With views, examples that carry "first_document" (the packer's number of the document their first token
is from) also give document_ids (B, L) long: first_document + d for the tokens of the block's d-th piece,
so the model can tell two pieces of one long document (in neighbouring blocks) from two documents.

Determinism: the collator owns a numpy Generator seeded from `seed`. Inside a DataLoader worker it
reseeds itself once per worker from (seed, worker_info.seed), so workers never repeat each other's
masks and runs are reproducible whenever torch is seeded (worker seeds derive from torch's RNG).
"""

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from textjepa.configuration_textjepa import (
    AT_LEAST_ONE,
    UNIT_OPEN,
    UNIT_RIGHT_OPEN,
    SettingError,
    range_problem,
)

SPAN_LENGTH_DISTRIBUTIONS = ("uniform", "geometric", "poisson")


@dataclass
class MaskingConfig:
    """Mask shape. Defaults are I-JEPA-like: 4 spans covering 30% of the sequence, one mask per sequence."""

    num_masks: int = 1  # K independent masks per sequence (the teacher reads the sequence once)
    target_ratio: float = 0.3  # fraction of positions that are targets, exact per row after rounding
    num_spans: int | None = 4  # target spans per mask (ignored when mean_span_length is set)
    span_length_distribution: Literal["uniform", "geometric", "poisson"] = "uniform"  # "uniform" (0.5x..1.5x the mean), "geometric", "poisson"
    mean_span_length: float | None = None  # when set: num_spans = round(Nt / mean_span_length)
    min_span_length: int = 1
    extra_context_drop: float = 0.0  # fraction of positions hidden from the student on top of targets
    allow_overlap: bool = False  # True: context sampled independently of targets, may include them
    special_token_ids: tuple = field(default_factory=tuple)  # never targets, unless a row has too few other positions
    num_views: int = 1  # 2, 4, ...: cut each block into that many segments (rows) for the cross-view target
    separator_token_id: int | None = None  # the packer's document separator (cross-view pairs check it)
    views: Literal["none", "document_halves", "documents"] = "none"  # segment_ids per (half) document piece (module doc)

    def __post_init__(self):
        """Checks each field (SettingError, named; the recipe reports it as mask.<field>)."""
        self.special_token_ids = tuple(int(t) for t in (self.special_token_ids or ()))

        def check(name, bounds, integer=False):
            value = getattr(self, name)
            if integer and (not isinstance(value, int) or isinstance(value, bool)):
                raise SettingError("MaskingConfig", name, f"expected int, got {value!r}")
            reason = range_problem(value, bounds)
            if reason:
                raise SettingError("MaskingConfig", name, reason)

        if self.views not in ("none", "document_halves", "documents"):
            raise SettingError("MaskingConfig", "views",
                               f"expected 'none', 'document_halves' or 'documents', got {self.views!r}")
        if self.views != "none" and self.num_views > 1:
            raise SettingError("MaskingConfig", "views", f"{self.views!r} and {{num_views}}={self.num_views} are two "
                               "ways to make views; use one")
        if self.views != "none" and self.separator_token_id is None:
            raise SettingError("MaskingConfig", "views", f"{self.views!r} needs {{separator_token_id}} (the "
                               "packer's document separator)")
        check("num_views", AT_LEAST_ONE, integer=True)
        if self.num_views > 1 and self.num_views % 2:
            raise SettingError("MaskingConfig", "num_views", f"expected 1 or an even number (segments in partner "
                               f"pairs), got {self.num_views}")
        check("num_masks", AT_LEAST_ONE, integer=True)
        check("target_ratio", UNIT_OPEN)
        check("extra_context_drop", UNIT_RIGHT_OPEN)
        if self.target_ratio + self.extra_context_drop >= 1.0:
            raise SettingError("MaskingConfig", "target_ratio", f"{self.target_ratio} + {{extra_context_drop}}="
                               f"{self.extra_context_drop} = {self.target_ratio + self.extra_context_drop} leaves "
                               "no context; the sum must be < 1")
        if self.span_length_distribution not in SPAN_LENGTH_DISTRIBUTIONS:
            raise SettingError("MaskingConfig", "span_length_distribution", f"expected one of "
                               f"{SPAN_LENGTH_DISTRIBUTIONS}, got {self.span_length_distribution!r}")
        check("min_span_length", AT_LEAST_ONE, integer=True)
        if self.num_spans is not None:  # used only without mean_span_length, checked either way
            check("num_spans", AT_LEAST_ONE, integer=True)
        elif self.mean_span_length is None:
            raise SettingError("MaskingConfig", "num_spans", "expected an int >= 1 (or set {mean_span_length}), "
                               "got None")
        if self.mean_span_length is not None:
            check("mean_span_length", AT_LEAST_ONE)
            if self.mean_span_length < self.min_span_length:
                raise SettingError("MaskingConfig", "mean_span_length", f"{self.mean_span_length} is below "
                                   f"{{min_span_length}}={self.min_span_length}")

    @classmethod
    def ijepa_like(cls, **overrides):
        """Few long spans: 4 spans, 30% of tokens (I-JEPA's 4 target blocks)."""
        return cls(**{**dict(target_ratio=0.3, num_spans=4, span_length_distribution="uniform"), **overrides})

    @classmethod
    def data2vec_like(cls, **overrides):
        """Many short spans: 50% of tokens in spans of mean length 4 (data2vec 2.0 text masks)."""
        return cls(**{**dict(target_ratio=0.5, num_spans=None, mean_span_length=4.0,
                             span_length_distribution="geometric"), **overrides})

    def counts(self, length):
        """(Nt, Nd, Nc, M) for sequences of `length` tokens; raises when the spans cannot fit."""
        num_targets = round(self.target_ratio * length)
        num_dropped = round(self.extra_context_drop * length)
        num_context = length - num_targets - num_dropped
        if self.mean_span_length is not None:
            num_spans = max(1, round(num_targets / self.mean_span_length))
        else:
            num_spans = self.num_spans
        if num_targets < 1 or num_context < 1:
            raise ValueError(
                f"sequence length {length} gives {num_targets} target and {num_context} context tokens "
                f"(target_ratio={self.target_ratio}, extra_context_drop={self.extra_context_drop}); both must be >= 1"
            )
        if num_spans * self.min_span_length > num_targets:
            views = f" (one of the num_views={self.num_views} segments of a block)" if self.num_views > 1 else ""
            raise ValueError(
                f"sequence length {length}{views} is too short for the spans: {num_targets} target tokens cannot hold "
                f"num_spans={num_spans} spans of min_span_length={self.min_span_length}; use longer sequences, "
                "fewer views or spans, or a larger target_ratio"
            )
        return num_targets, num_dropped, num_context, num_spans


def _random_ranks(rng, shape):
    """Ranks 0..n-1 in random order along the last axis: (rows, n) int."""
    return np.argsort(rng.random(shape), axis=-1).argsort(axis=-1)


def sample_span_lengths(rng, rows, num_targets, num_spans, min_span_length, distribution):
    """(rows, num_spans) int64 span lengths, each >= min_span_length, every row summing to num_targets."""
    extra_total = num_targets - num_spans * min_span_length  # tokens above the minimum, shared out below
    mean_extra = extra_total / num_spans
    shape = (rows, num_spans)
    if distribution == "uniform":
        weights = rng.uniform(0.5 * mean_extra, 1.5 * mean_extra, shape)
    elif distribution == "geometric":
        weights = rng.geometric(1.0 / (mean_extra + 1.0), shape) - 1.0
    else:  # poisson
        weights = rng.poisson(mean_extra, shape).astype(np.float64)
    weights = weights + 1e-6  # all-zero rows share equally
    share = weights / weights.sum(axis=1, keepdims=True) * extra_total
    extra = np.floor(share).astype(np.int64)
    leftover = extra_total - extra.sum(axis=1, keepdims=True)  # (rows, 1), in [0, num_spans)
    extra += _random_ranks(rng, shape) < leftover  # hand the leftover tokens to random spans
    return min_span_length + extra


def sample_span_masks(rng, rows, length, num_targets, num_spans, min_span_length=1, distribution="uniform"):
    """(rows, length) bool masks with exactly num_targets True per row, in num_spans spans (see module doc)."""
    lengths = sample_span_lengths(rng, rows, num_targets, num_spans, min_span_length, distribution)
    # gaps: sorted cut points in the L - Nt non-target tokens; span j starts after cut j and spans 0..j-1
    cuts = np.sort(rng.integers(0, length - num_targets + 1, size=(rows, num_spans)), axis=1)
    starts = cuts + np.cumsum(lengths, axis=1) - lengths
    starts += rng.integers(0, length, size=(rows, 1))  # rotation; starts + lengths <= 2L - 1
    # +1 at each start, -1 at each end in a (rows, 2L+1) difference array, cumsum, fold the wrap back
    row_offset = np.arange(rows)[:, None] * (2 * length + 1)
    diff = np.bincount((row_offset + starts).ravel(), minlength=rows * (2 * length + 1))
    diff -= np.bincount((row_offset + starts + lengths).ravel(), minlength=rows * (2 * length + 1))
    covered = np.cumsum(diff.reshape(rows, 2 * length + 1), axis=1)[:, : 2 * length] > 0
    return covered[:, :length] | covered[:, length:]


def _neighbours(mask):
    """Positions next to a True position (not wrapping): (rows, L) bool."""
    near = np.zeros_like(mask)
    near[:, 1:] |= mask[:, :-1]
    near[:, :-1] |= mask[:, 1:]
    return near


def _pick(rng, eligible, counts, prefer=None):
    """(rows, L) bool selecting counts[r] random eligible positions per row, preferred ones first.

    Callers guarantee counts[r] <= eligible[r].sum(). Random keys in [0, 1), +2 when not preferred,
    +4 when not eligible; the counts[r] smallest keys of row r win (one sort, no argsort of argsort)."""
    keys = rng.random(eligible.shape) + np.where(eligible, 0.0, 4.0)
    if prefer is not None:
        keys += np.where(prefer, 0.0, 2.0)
    counts = np.asarray(counts).reshape(-1, 1)
    kth = np.take_along_axis(np.sort(keys, axis=1), np.maximum(counts - 1, 0), axis=1)  # (rows, 1)
    return (keys <= kth) & (counts > 0)


def sample_masks(config, rng, batch_size, length, input_ids=None):
    """Numpy core of the collator: (context_idx (B, K, Nc), target_idx (B, K, Nt)) int64 arrays."""
    num_targets, num_dropped, num_context, num_spans = config.counts(length)
    K = config.num_masks
    rows = batch_size * K  # row b*K + k is mask k of sample b
    sample = dict(num_spans=num_spans, min_span_length=config.min_span_length,
                  distribution=config.span_length_distribution)
    target = sample_span_masks(rng, rows, length, num_targets, **sample)

    if config.special_token_ids and input_ids is not None:
        allowed = ~np.isin(np.asarray(input_ids), config.special_token_ids)  # (B, L)
        allowed = np.repeat(allowed, K, axis=0)  # (B*K, L)
        target &= allowed
        missing = num_targets - target.sum(axis=1)  # (B*K,)
        if missing.any():  # refill, growing the existing spans where possible
            free = allowed & ~target  # (B*K, L) ordinary positions not yet targets
            target |= _pick(rng, free, np.minimum(missing, free.sum(axis=1)), prefer=_neighbours(target))
            missing = num_targets - target.sum(axis=1)
            if missing.any():  # a row with fewer than Nt ordinary tokens (e.g. text outside the vocabulary, all
                # [UNK]) takes the shortfall from its special positions rather than stop the run mid-epoch
                target |= _pick(rng, ~target, missing, prefer=_neighbours(target))

    if config.allow_overlap:
        hidden = sample_span_masks(rng, rows, length, num_targets, **sample)
    else:
        hidden = target
    if num_dropped:
        hidden = hidden | _pick(rng, ~hidden, np.full(rows, num_dropped))
    context = ~hidden

    target_idx = np.nonzero(target)[1].reshape(batch_size, K, num_targets)
    context_idx = np.nonzero(context)[1].reshape(batch_size, K, num_context)
    return context_idx, target_idx


class SpanMaskCollator:
    """examples (list of {"input_ids": list[int] | 1-D tensor, optional "first_document": int}, all of length
    L) -> batch dict:

    input_ids (B, L) long; context_idx (B, K, Nc) long and target_idx (B, K, Nt) long, each sorted
    ascending per row; context and targets disjoint unless config.allow_overlap; and the views' tensors
    (module doc).
    """

    def __init__(self, config=None, seed=0):
        self.config = config if config is not None else MaskingConfig()
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._worker_key = None  # (worker id, worker seed) the generator was last reseeded for

    def _generator(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_key != (info.id, info.seed):
            # each DataLoader worker holds a copy of this collator: give each its own stream
            self._worker_key = (info.id, info.seed)
            self.rng = np.random.default_rng([self.seed, info.seed])
        return self.rng

    def state_dict(self):
        return {"seed": self.seed, "bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.seed = state["seed"]
        self.rng.bit_generator.state = state["bit_generator"]

    def __call__(self, examples):
        if not examples:
            raise ValueError("SpanMaskCollator got an empty list of examples")
        rows = [ex["input_ids"] for ex in examples]
        if torch.is_tensor(rows[0]):
            lengths = {int(r.numel()) for r in rows}
        else:
            lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(
                f"SpanMaskCollator needs equal-length sequences (packed blocks); got lengths {sorted(lengths)}"
            )
        if torch.is_tensor(rows[0]):
            input_ids = torch.stack(rows).long()
        else:
            input_ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        extra = {}
        if self.config.num_views > 1:
            input_ids, extra["same_document"] = split_views(input_ids, self.config.separator_token_id,
                                                            self.config.num_views)
        elif self.config.views != "none":
            segments, positions = document_segments(input_ids.numpy(), self.config.separator_token_id,
                                                    halves=self.config.views == "document_halves")
            extra.update(segment_ids=torch.from_numpy(segments), position_ids=torch.from_numpy(positions))
            if "first_document" in examples[0]:  # piece d of a row is from document first_document + d
                pieces = segments // 2 if self.config.views == "document_halves" else segments
                first = np.asarray([int(ex["first_document"]) for ex in examples], dtype=np.int64)
                extra["document_ids"] = torch.from_numpy(first[:, None] + pieces)
        context_idx, target_idx = sample_masks(self.config, self._generator(), input_ids.shape[0],
                                               input_ids.shape[1], input_ids.numpy())
        return {
            "input_ids": input_ids,
            "context_idx": torch.from_numpy(context_idx),
            "target_idx": torch.from_numpy(target_idx),
            **extra,
        }


def split_views(input_ids, separator_token_id, num_views=2):
    """(B, L) blocks -> ((B*V, L/V) segments, same_document (B*V,) bool); see the module doc.

    Segment v of block b is row b*V + v; neighbouring rows 2j and 2j+1 are partners, and a pair is from
    one document when no separator lies strictly inside the 2L/V tokens the two segments span."""
    batch, length = input_ids.shape
    if num_views % 2 or length % num_views:
        raise ValueError(f"masking.num_views={num_views} must be even and divide the block length {length}")
    segments = input_ids.reshape(batch * num_views, length // num_views)
    pairs = input_ids.reshape(batch * num_views // 2, 2 * length // num_views)  # one row per partner pair
    if separator_token_id is None:
        same = torch.ones(pairs.shape[0], dtype=torch.bool)
    else:  # a separator at a pair's very first or last position does not split the two segments' text
        same = ~(pairs[:, 1:-1] == separator_token_id).any(dim=1)
    return segments, same.repeat_interleave(2)


def document_segments(input_ids, separator_token_id, halves=True):
    """(B, L) int ids -> (segment_ids, position_ids), both (B, L) int64: segment 2d / 2d+1 is the first /
    second half of the d-th document piece of each row (a separator belongs to the piece it ends), or, with
    halves=False, segment d is the whole piece; each token's position counts from the start of its segment;
    see the module doc."""
    rows, length = input_ids.shape
    is_separator = input_ids == separator_token_id
    document = np.cumsum(is_separator, axis=1) - is_separator  # separators strictly before each position
    starts = np.ones_like(is_separator)
    starts[:, 1:] = is_separator[:, :-1]  # a piece starts at 0 and after every separator
    positions = np.broadcast_to(np.arange(length), (rows, length))
    start = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)
    rank = positions - start  # position within the piece
    if halves:
        flat = document + np.arange(rows)[:, None] * length  # a unique id per (row, piece)
        piece_length = np.bincount(flat.ravel(), minlength=rows * length)[flat]
        segments = (2 * document + (2 * rank >= piece_length)).astype(np.int64)
    else:
        segments = document.astype(np.int64)
    changes = np.ones_like(is_separator)
    changes[:, 1:] = segments[:, 1:] != segments[:, :-1]
    segment_start = np.maximum.accumulate(np.where(changes, positions, 0), axis=1)
    return segments, (positions - segment_start).astype(np.int64)
