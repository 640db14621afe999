"""Span-mask collator: exact counts, ranges, disjointness, coverage of every position, K masks, seeds."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from textjepa.masking import MaskingConfig, SpanMaskCollator, sample_span_masks


def make_examples(batch_size, length, seed=0, vocab=50):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(5, vocab, length).tolist()} for _ in range(batch_size)]


def runs(row_mask):
    """Number of maximal runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], row_mask, [False]])
    return int((np.diff(padded.astype(np.int8)) == 1).sum())


config_kwargs = st.fixed_dictionaries(dict(
    num_masks=st.integers(1, 4),
    target_ratio=st.floats(0.05, 0.6),
    num_spans=st.integers(1, 6),
    span_length_distribution=st.sampled_from(["uniform", "geometric", "poisson"]),
    mean_span_length=st.one_of(st.none(), st.floats(1.0, 6.0)),
    min_span_length=st.integers(1, 3),
    extra_context_drop=st.sampled_from([0.0, 0.1, 0.25]),
    allow_overlap=st.booleans(),
))


def valid_counts(kwargs, length):
    """(config, counts) or None when the drawn fields are rejected (by MaskingConfig or for this length)."""
    try:
        config = MaskingConfig(**kwargs)
        return config, config.counts(length)
    except ValueError:
        return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=config_kwargs, length=st.integers(8, 96), batch_size=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_collator_shapes_ranges_counts_and_disjointness(kwargs, length, batch_size, seed):
    drawn = valid_counts(kwargs, length)
    assume(drawn is not None)
    config, (num_targets, num_dropped, num_context, _) = drawn
    examples = make_examples(batch_size, length, seed=seed % 1000)
    batch = SpanMaskCollator(config, seed=seed)(examples)
    K = config.num_masks

    assert batch["input_ids"].shape == (batch_size, length) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [ex["input_ids"] for ex in examples]
    ctx, tgt = batch["context_idx"].numpy(), batch["target_idx"].numpy()
    assert ctx.shape == (batch_size, K, num_context) and tgt.shape == (batch_size, K, num_targets)
    assert batch["context_idx"].dtype == torch.long and batch["target_idx"].dtype == torch.long
    assert num_targets == round(config.target_ratio * length)
    assert num_context == length - num_targets - round(config.extra_context_drop * length)
    for idx in (ctx, tgt):
        assert idx.min() >= 0 and idx.max() < length
        assert (np.diff(idx, axis=-1) > 0).all()  # strictly ascending: sorted and no duplicates
    if not config.allow_overlap:
        for b in range(batch_size):
            for k in range(K):
                assert not set(ctx[b, k]) & set(tgt[b, k])


def test_every_position_is_a_target_with_the_same_probability():
    # rotation makes P(target at i) = Nt / L for all i, first and last position included
    length, rows = 64, 6000
    for config in (MaskingConfig.ijepa_like(), MaskingConfig.data2vec_like()):
        num_targets, _, _, num_spans = config.counts(length)
        masks = sample_span_masks(np.random.default_rng(0), rows, length, num_targets, num_spans,
                                  distribution=config.span_length_distribution)
        assert (masks.sum(axis=1) == num_targets).all()
        freq = masks.mean(axis=0)
        expected = num_targets / length
        assert freq[0] > 0 and freq[-1] > 0
        # binomial sd at p=0.5, n=6000 is 0.0065: 0.04 is > 6 sd
        assert np.abs(freq - expected).max() < 0.04, (freq[:4], freq[-4:], expected)


def test_target_ratio_over_many_batches_matches_config():
    config = MaskingConfig(target_ratio=0.37, num_masks=2, extra_context_drop=0.1)
    collator = SpanMaskCollator(config, seed=1)
    length = 50
    target_fraction, context_fraction = [], []
    for i in range(20):
        batch = collator(make_examples(8, length, seed=i))
        target_fraction.append(batch["target_idx"].shape[-1] / length)
        context_fraction.append(batch["context_idx"].shape[-1] / length)
    assert abs(np.mean(target_fraction) - 0.37) <= 0.5 / length
    assert abs(np.mean(context_fraction) - (1 - 0.37 - 0.1)) <= 1.0 / length


def test_span_structure_ijepa_like_and_data2vec_like():
    length, rows = 128, 2000
    ijepa = MaskingConfig.ijepa_like()
    nt, _, _, m = ijepa.counts(length)
    masks = sample_span_masks(np.random.default_rng(0), rows, length, nt, m, distribution="uniform")
    num_runs = np.array([runs(r) for r in masks])
    # 4 spans, +1 when one wraps around the end, fewer when spans touch
    assert num_runs.max() <= m + 1 and np.mean(num_runs) > 3.0

    d2v = MaskingConfig.data2vec_like()
    nt, _, _, m = d2v.counts(length)
    assert nt == 64 and m == 16
    masks = sample_span_masks(np.random.default_rng(0), rows, length, nt, m, distribution="geometric")
    mean_run = nt / np.mean([runs(r) for r in masks])
    assert 3.0 < mean_run < 8.0  # short spans (adjacent spans merge into longer runs)


def test_k_masks_differ_and_seeds_are_deterministic():
    config = MaskingConfig(num_masks=4)
    examples = make_examples(6, 64)
    a = SpanMaskCollator(config, seed=3)(examples)
    b = SpanMaskCollator(config, seed=3)(examples)
    c = SpanMaskCollator(config, seed=4)(examples)
    assert torch.equal(a["target_idx"], b["target_idx"]) and torch.equal(a["context_idx"], b["context_idx"])
    assert not torch.equal(a["target_idx"], c["target_idx"])
    tgt = a["target_idx"]
    for s in range(tgt.shape[0]):
        distinct = {tuple(tgt[s, k].tolist()) for k in range(4)}
        assert len(distinct) == 4
    # consecutive batches of the same collator differ too
    collator = SpanMaskCollator(config, seed=3)
    first, second = collator(examples), collator(examples)
    assert not torch.equal(first["target_idx"], second["target_idx"])


def test_state_dict_resumes_the_stream():
    collator = SpanMaskCollator(MaskingConfig(), seed=0)
    examples = make_examples(4, 32)
    collator(examples)
    state = collator.state_dict()
    expected = collator(examples)
    resumed = SpanMaskCollator(MaskingConfig(), seed=123)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(examples)["target_idx"], expected["target_idx"])


class RepeatedBlocks(torch.utils.data.Dataset):
    def __init__(self, n, length):
        self.example = make_examples(1, length)[0]
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.example


def test_dataloader_workers_get_distinct_reproducible_streams():
    def masks(seed):
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(RepeatedBlocks(8, 32), batch_size=2, num_workers=2,
                                             collate_fn=SpanMaskCollator(MaskingConfig(), seed=0))
        return [batch["target_idx"] for batch in loader]

    run_a, run_b = masks(0), masks(0)
    assert all(torch.equal(x, y) for x, y in zip(run_a, run_b))
    # batches 0 and 1 come from workers 0 and 1 with the same input: their masks must differ
    assert not torch.equal(run_a[0], run_a[1])
    assert len({tuple(t.flatten().tolist()) for t in run_a}) == len(run_a)


def test_special_tokens_are_never_targets_and_counts_stay_exact():
    sep = 2
    config = MaskingConfig(num_masks=3, target_ratio=0.4, special_token_ids=[sep, 0])
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(16):
        ids = rng.integers(5, 50, 40)
        ids[rng.choice(40, 6, replace=False)] = sep
        ids[0] = 0
        examples.append({"input_ids": torch.tensor(ids)})
    batch = SpanMaskCollator(config, seed=0)(examples)
    input_ids, tgt = batch["input_ids"], batch["target_idx"]
    assert tgt.shape == (16, 3, 16)
    for b in range(16):
        target_ids = input_ids[b][tgt[b]]
        assert not torch.isin(target_ids, torch.tensor([sep, 0])).any()
    assert (torch.diff(tgt, dim=-1) > 0).all()


def test_a_row_of_mostly_special_tokens_takes_its_shortfall_from_them():
    # A block of text outside the vocabulary is mostly [UNK] (a special id): Nt = 12 targets of 40, but the
    # first row holds only 5 ordinary tokens. It must keep all 5 and take 7 special positions, while the
    # ordinary row beside it never targets a special token, and the masks stay those of a run without it.
    unk = 3
    config = MaskingConfig(target_ratio=0.3, num_spans=2, special_token_ids=[unk])
    mostly_unknown = [unk] * 35 + [8, 9, 10, 11, 12]
    ordinary = list(range(5, 45))
    batch = SpanMaskCollator(config, seed=1)([{"input_ids": mostly_unknown}, {"input_ids": ordinary}])
    tgt = batch["target_idx"]
    assert tgt.shape == (2, 1, 12)
    first = set(tgt[0, 0].tolist())
    assert set(range(35, 40)) <= first and len(first) == 12
    assert batch["context_idx"].shape == (2, 1, 28)
    assert not set(batch["context_idx"][0, 0].tolist()) & first
    # beside an ordinary first row, from the same seed, the second row draws the same mask: the short row's
    # refill comes after every other row's draws
    beside_ordinary = SpanMaskCollator(config, seed=1)([{"input_ids": ordinary}, {"input_ids": ordinary}])
    assert torch.equal(beside_ordinary["target_idx"][1], tgt[1])


def test_allow_overlap_lets_context_include_targets():
    config = MaskingConfig(allow_overlap=True, target_ratio=0.4)
    batch = SpanMaskCollator(config, seed=0)(make_examples(32, 64))
    ctx, tgt = batch["context_idx"], batch["target_idx"]
    assert ctx.shape[-1] == 64 - round(0.4 * 64)
    overlaps = [len(set(ctx[b, 0].tolist()) & set(tgt[b, 0].tolist())) for b in range(32)]
    assert max(overlaps) > 0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="too short for the spans"):
        SpanMaskCollator(MaskingConfig(num_spans=4, min_span_length=3))(make_examples(2, 16))
    with pytest.raises(ValueError, match="equal-length"):
        SpanMaskCollator()([{"input_ids": [5] * 10}, {"input_ids": [5] * 12}])
    with pytest.raises(ValueError, match="empty list"):
        SpanMaskCollator()([])
    with pytest.raises(ValueError, match="target_ratio"):
        MaskingConfig(target_ratio=1.2)
    with pytest.raises(ValueError, match="leaves no context"):
        MaskingConfig(target_ratio=0.6, extra_context_drop=0.5)
    with pytest.raises(ValueError, match="span_length_distribution"):
        MaskingConfig(span_length_distribution="zipf")
    with pytest.raises(ValueError, match="num_spans"):
        MaskingConfig(num_spans=None)
