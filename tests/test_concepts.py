"""Concept-level targets: span concepts, two views per block with the cross-view target, and the
pooled-space guards (VICReg, SIGReg). Shapes, known answers, gradients, determinism."""

import math

import pytest
import torch
from conftest import tiny_config_kwargs

from textjepa import TextJepaConfig, TextJepaForPreTraining, pool_hidden_states
from textjepa.masking import MaskingConfig, SpanMaskCollator, split_views
from textjepa.objectives import (
    cosine_distance,
    pooled_regularizer,
    sigreg_statistic,
    span_means,
    uniformity_loss,
    vicreg_regularizer,
)

SEP = 2


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return TextJepaForPreTraining(TextJepaConfig(**tiny_config_kwargs(**overrides)))


def view_batch(batch=4, length=32, seed=0, separator_in=()):
    """Collated two-view batch of `batch` blocks; blocks listed in separator_in get a separator inside."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(3, 97, (batch, length), generator=generator)
    for i in separator_in:
        blocks[i, length // 3] = SEP
    config = MaskingConfig(target_ratio=0.25, num_spans=2, num_views=2, separator_token_id=SEP,
                           special_token_ids=(0, 1, SEP))
    return SpanMaskCollator(config, seed=seed)([{"input_ids": row} for row in blocks]), blocks


def test_split_views_pairs_halves_and_checks_document_boundaries():
    blocks = torch.arange(24).reshape(3, 8) + 10
    blocks[1, 5] = SEP  # inside block 1: its halves come from different documents
    blocks[2, 0] = SEP  # at the very start: block 2 is still one document
    segments, same = split_views(blocks, SEP)
    assert segments.shape == (6, 4)
    torch.testing.assert_close(segments[2], blocks[1, :4])
    torch.testing.assert_close(segments[3], blocks[1, 4:])
    assert same.tolist() == [True, True, False, False, True, True]
    with pytest.raises(ValueError, match="divide the block length"):
        split_views(blocks[:, :7], SEP)
    # four views: pairs (0, 1) and (2, 3) of each block, each pair checked on its own 4 tokens
    segments, same = split_views(blocks, SEP, num_views=4)
    assert segments.shape == (12, 2)
    torch.testing.assert_close(segments[5], blocks[1, 2:4])
    assert same.tolist() == [True] * 4 + [True, True, False, False] + [True] * 4
    with pytest.raises(ValueError, match="even"):
        split_views(blocks, SEP, num_views=3)


def test_collator_with_two_views_masks_each_segment():
    batch, blocks = view_batch(batch=4, length=32, separator_in=(2,))
    assert batch["input_ids"].shape == (8, 16)
    assert batch["same_document"].tolist() == [True] * 4 + [False] * 2 + [True] * 2
    assert batch["context_idx"].shape == (8, 1, 12) and batch["target_idx"].shape == (8, 1, 4)
    assert int(batch["context_idx"].max()) < 16 and int(batch["target_idx"].max()) < 16
    for row in range(8):  # disjoint and together a subset of the segment
        context, target = set(batch["context_idx"][row, 0].tolist()), set(batch["target_idx"][row, 0].tolist())
        assert not context & target and len(context | target) == 16


def test_span_means_known_answer():
    values = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)  # (N=2, Nt=3, H=2)
    target_idx = torch.tensor([[4, 5, 9], [0, 1, 2]])  # row 0: spans {4,5} and {9}; row 1: one span
    expected = torch.tensor([[1.0, 2.0], [4.0, 5.0], [8.0, 9.0]])
    torch.testing.assert_close(span_means(values, target_idx), expected)


def test_each_term_is_zero_when_prediction_equals_target():
    x = torch.randn(6, 5, 8)
    target_idx = torch.tensor([[0, 1, 4, 5, 6]] * 6)
    assert cosine_distance(span_means(x, target_idx), span_means(x, target_idx)).item() == pytest.approx(0, abs=1e-6)
    flat = x[:, 0]
    assert cosine_distance(flat, flat).item() == pytest.approx(0, abs=1e-6)
    assert cosine_distance(flat, -flat).item() == pytest.approx(2, abs=1e-6)
    # weights: only the weighted rows count; no weighted row -> 0, not NaN
    assert cosine_distance(flat, -flat, torch.zeros(6)).item() == 0.0
    empty = torch.zeros(0, 8, requires_grad=True)  # a batch without any cross-view pair
    assert cosine_distance(empty, empty).item() == 0.0 and cosine_distance(empty, empty).requires_grad
    weights = torch.tensor([1.0, 0, 0, 0, 0, 0])
    mixed = torch.cat([flat[:1], -flat[1:]])
    assert cosine_distance(flat, mixed, weights).item() == pytest.approx(0, abs=1e-6)


def test_pooled_guards_tell_gaussian_from_collapsed():
    torch.manual_seed(0)
    gaussian = torch.randn(512, 32)
    collapsed = torch.ones(512, 32) * 0.3 + 1e-3 * torch.randn(512, 32)
    rank_one = torch.randn(512, 1) * torch.ones(1, 32) / 32**0.5 * 3
    sig = {name: sigreg_statistic(x, 128).item() for name, x in
           (("gaussian", gaussian), ("collapsed", collapsed), ("rank_one", rank_one))}
    assert sig["gaussian"] < 0.01  # ~1/N
    assert sig["collapsed"] > 0.2 and sig["rank_one"] > 0.05
    assert vicreg_regularizer(gaussian).item() < 0.2
    assert vicreg_regularizer(collapsed).item() > 0.9
    # differentiable, and pushing on it spreads a collapsed batch
    x = collapsed.clone().requires_grad_(True)
    sigreg_statistic(x, 64).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # uniformity: spread directions near log E exp(-2 * 2) = -4 on the sphere, one direction 0; its gradient
    # pushes a tight cluster apart
    assert uniformity_loss(gaussian).item() < -3.5 and uniformity_loss(collapsed).item() > -0.01
    y = (collapsed + 0.05 * torch.randn(512, 32)).requires_grad_(True)
    loss = uniformity_loss(y)
    loss.backward()
    with torch.no_grad():
        assert uniformity_loss(y - 1.0 * y.grad).item() < loss.item()


def test_uniformity_sharpness_weighs_the_nearest_pair():
    """uniformity_t is the potential's t: log mean exp(-t ||u - v||^2) over pairs; a larger t puts more of the
    push on the batch's closest pair (SimCSE-like hard negatives), and the model's term reads config.uniformity_t."""
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    x[1] = torch.nn.functional.normalize(x[0] + 0.1 * torch.randn(32), dim=-1)  # one near-duplicate pair
    pairs = [(x[i] - x[j]).pow(2).sum() for i in range(16) for j in range(i + 1, 16)]
    torch.testing.assert_close(uniformity_loss(x, 10.0), torch.stack(pairs).mul(-10.0).exp().mean().log())
    share = {}
    for t in (2.0, 10.0):
        y = x.clone().requires_grad_(True)
        uniformity_loss(y, t).backward()
        norms = y.grad.norm(dim=-1)
        share[t] = (norms[:2].sum() / norms.sum()).item()
    assert share[10.0] > 2 * share[2.0]
    config = make_model(pooled_reg="uniformity", pooled_reg_weight=1.0, uniformity_t=10.0).config
    torch.testing.assert_close(pooled_regularizer(x, config), uniformity_loss(x, 10.0))
    with pytest.raises(Exception, match="uniformity_t: expected a number > 0"):
        TextJepaConfig(**tiny_config_kwargs(uniformity_t=0.0))


@pytest.mark.parametrize("reg", ["vicreg", "sigreg", "uniformity"])
def test_concept_terms_train_student_and_heads_never_the_teacher(reg):
    model = make_model(span_loss_weight=1.0, cross_view_loss_weight=1.0, sentence_loss_weight=1.0,
                       bottleneck_loss_weight=0.5, pooled_reg=reg, pooled_reg_weight=0.1)
    batch, _ = view_batch(batch=4, length=32, separator_in=(1,))
    out = model(**batch)
    assert set(out.loss_terms) == {"token_loss", "span_loss", "sentence_loss", "cross_view_loss", "bottleneck_loss",
                                   "pooled_reg"}
    config = model.config
    expected = (out.loss_terms["token_loss"] + config.span_loss_weight * out.loss_terms["span_loss"]
                + out.loss_terms["sentence_loss"] + out.loss_terms["cross_view_loss"]
                + 0.5 * out.loss_terms["bottleneck_loss"] + 0.1 * out.loss_terms["pooled_reg"])
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    for module in (model.textjepa.embeddings.word_embeddings, model.predictor.output_projection,
                   model.view_predictor[0], model.sentence_predictor[0], model.bottleneck_predictor.input_projection):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_bottleneck_decoder_reads_only_the_pooled_vector():
    model = make_model(bottleneck_loss_weight=1.0, token_loss_weight=0.0, sentence_loss_weight=0.0)
    assert len(model.bottleneck_predictor.layers) == 1
    batch, _ = view_batch(batch=2, length=32)
    with torch.no_grad():
        targets = model.compute_targets(batch["input_ids"], target_idx=batch["target_idx"][:, 0])
        context_idx = batch["context_idx"][:, 0]
        pooled = model.textjepa(batch["input_ids"].gather(1, context_idx), position_ids=context_idx
                                ).last_hidden_state.mean(dim=1)
        decoded = model.bottleneck_predictor(pooled[:, None], torch.zeros(4, 1, dtype=torch.long),
                                             batch["target_idx"][:, 0])
    out = model(**batch)
    assert set(out.loss_terms) == {"bottleneck_loss"}
    torch.testing.assert_close(out.loss_terms["bottleneck_loss"], model.compute_loss(decoded, targets))


def test_cross_view_target_is_the_partners_pooled_teacher_embedding():
    model = make_model(cross_view_loss_weight=1.0, sentence_loss_weight=0.0)
    batch, _ = view_batch(batch=2, length=32)
    out = model(**batch)
    # recompute by hand: row r predicts the teacher's mean-pooled segment r ^ 1
    with torch.no_grad():
        teacher_pooled = pool_hidden_states(model.teacher(batch["input_ids"]).last_hidden_state)
        context_idx = batch["context_idx"][:, 0]
        context_ids = batch["input_ids"].gather(1, context_idx)
        student = model.textjepa(context_ids, position_ids=context_idx).last_hidden_state.mean(dim=1)
        predicted = model.view_predictor(student)
    expected = cosine_distance(predicted, teacher_pooled[[1, 0, 3, 2]])
    torch.testing.assert_close(out.loss_terms["cross_view_loss"], expected)
    # pairs that straddle a document boundary carry no cross-view loss
    cut = dict(batch, same_document=torch.tensor([False, False, True, True]))
    expected_cut = cosine_distance(predicted[2:], teacher_pooled[[3, 2]])
    torch.testing.assert_close(model(**cut).loss_terms["cross_view_loss"], expected_cut)
    # a batch without any same-document pair: the term is 0, not NaN, and training goes on
    none = model(**dict(batch, same_document=torch.zeros(4, dtype=torch.bool)))
    assert none.loss_terms["cross_view_loss"].item() == 0.0 and torch.isfinite(none.loss)


def test_student_cross_view_is_lejepa_without_a_teacher_pass(monkeypatch):
    """cross_view_target="student": partners' projections pulled to their mean, SIGReg on the
    projections, gradients through both partners, and no teacher forward when nothing else reads it."""
    model = make_model(cross_view_loss_weight=1.0, cross_view_target="student", token_loss_weight=0.0,
                       sentence_loss_weight=0.0, pooled_reg="sigreg", pooled_reg_weight=0.5)
    batch, _ = view_batch(batch=2, length=32)
    monkeypatch.setattr(model, "compute_targets", lambda *a, **k: pytest.fail("teacher pass without a reader"))
    torch.manual_seed(1)
    out = model(**batch)
    assert set(out.loss_terms) == {"cross_view_loss", "pooled_reg"} and out.targets is None
    with torch.no_grad():
        context_idx = batch["context_idx"][:, 0]
        context_ids = batch["input_ids"].gather(1, context_idx)
        student = model.textjepa(context_ids, position_ids=context_idx).last_hidden_state.mean(dim=1)
        z = model.view_predictor(student)  # (4, H): rows 0-1 and 2-3 are partners
    expected = torch.stack([((z[0] - z[1]) / 2).pow(2).mean(), ((z[2] - z[3]) / 2).pow(2).mean()]).mean()
    torch.testing.assert_close(out.loss_terms["cross_view_loss"], expected)
    torch.manual_seed(1)
    torch.testing.assert_close(out.loss_terms["pooled_reg"], sigreg_statistic(z, model.config.sigreg_num_slices))
    torch.testing.assert_close(out.loss.detach(), expected + 0.5 * out.loss_terms["pooled_reg"])
    out.loss.backward()
    for module in (model.textjepa.embeddings.word_embeddings, model.view_predictor[0]):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    # identical partners: no invariance loss; no same-document pair: 0, not NaN
    same = dict(batch, input_ids=batch["input_ids"][[0, 0, 2, 2]], context_idx=batch["context_idx"][[0, 0, 2, 2]],
                target_idx=batch["target_idx"][[0, 0, 2, 2]])
    assert make_model(cross_view_loss_weight=1.0, cross_view_target="student", token_loss_weight=0.0,
                      sentence_loss_weight=0.0)(**same).loss_terms["cross_view_loss"].item() < 1e-12
    none = model(**dict(batch, same_document=torch.zeros(4, dtype=torch.bool)))
    assert none.loss_terms["cross_view_loss"].item() == 0.0 and torch.isfinite(none.loss)
    with pytest.raises(Exception, match="cross_view_target"):
        TextJepaConfig(**tiny_config_kwargs(cross_view_target="teachr"))


def test_without_token_terms_the_predictor_is_skipped_and_all_off_is_an_error():
    model = make_model(token_loss_weight=0.0, sentence_loss_weight=1.0)
    batch, _ = view_batch(batch=2, length=32)
    out = model(**batch)
    assert out.predictions is None and set(out.loss_terms) == {"sentence_loss"}
    off = make_model(token_loss_weight=0.0, sentence_loss_weight=0.0)
    with pytest.raises(ValueError, match="every loss term is off"):
        off(**batch)
    with pytest.raises(Exception, match="span_loss_weight"):
        TextJepaConfig(**tiny_config_kwargs(span_loss_weight=-1.0))


def test_concept_losses_are_deterministic_under_a_seed():
    kwargs = dict(span_loss_weight=1.0, cross_view_loss_weight=1.0, pooled_reg="sigreg", pooled_reg_weight=0.1)
    batch, _ = view_batch(batch=4, length=32)
    losses = []
    for _ in range(2):
        model = make_model(seed=3, **kwargs)
        torch.manual_seed(7)
        losses.append(model(**batch).loss.item())
    assert losses[0] == losses[1]


def test_document_halves_segments_and_positions():
    from textjepa.masking import document_segments

    ids = torch.tensor([[5, 6, 7, SEP, 8, 9, SEP, 4, 4, 4, 4, 4],
                        [SEP, 5, 5, 5, 5, SEP, 3, 3, 3, 3, 3, 3]]).numpy()
    segments, positions = document_segments(ids, SEP)
    assert segments.tolist() == [[0, 0, 1, 1, 2, 2, 3, 4, 4, 4, 5, 5], [0, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5]]
    assert positions.tolist() == [[0, 1, 0, 1, 0, 1, 0, 0, 1, 2, 0, 1], [0, 0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2]]


def test_document_segments_without_the_cut_are_whole_pieces():
    from textjepa.masking import document_segments

    ids = torch.tensor([[5, 6, 7, SEP, 8, 9, SEP, 4, 4, 4, 4, 4]]).numpy()
    segments, positions = document_segments(ids, SEP, halves=False)
    assert segments.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]]
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]]


def two_document_rows():
    """A collated batch of 2 rows x 32 tokens, each row two documents (views="documents")."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, 97, (2, 32), generator=generator)
    blocks[0, 11], blocks[1, 20] = SEP, SEP
    config = MaskingConfig(target_ratio=0.25, num_spans=2, views="documents", separator_token_id=SEP,
                           special_token_ids=(0, 1, SEP))
    return SpanMaskCollator(config, seed=0)([{"input_ids": row} for row in blocks])


def student_and_teacher_pooled(model, batch):
    """What the sentence term compares: the student's read of its visible context (StudentView, 2 segments)
    and the teacher's pooled whole segments (B, 2, H)."""
    _, teacher = model.compute_targets(batch["input_ids"], return_sentence=True, segment_ids=batch["segment_ids"],
                                       position_ids=batch["position_ids"])
    student = model._read_context(batch["input_ids"], None, batch["position_ids"], batch["segment_ids"],
                                  batch["context_idx"], batch["target_idx"], segmented=True, num_segments=2)
    return student, teacher


def test_identity_pooled_head_compares_the_students_own_vector_with_the_teachers():
    # pooled_head="identity": the sentence loss is the cosine distance between the student's pooled visible
    # context and the teacher's pooled whole document (views="documents"), nothing learnt in between

    model = make_model(token_loss_weight=0.0, sentence_loss_weight=1.0, pooled_head="identity")
    batch = two_document_rows()
    assert batch["segment_ids"].max() == 1
    out = model(**batch)
    student, teacher = student_and_teacher_pooled(model, batch)
    expected = cosine_distance(student.pooled[student.has], teacher[student.has])
    torch.testing.assert_close(out.loss_terms["sentence_loss"], expected)
    assert not list(model.sentence_predictor.parameters())


def test_full_view_guard_spreads_the_students_read_of_each_whole_document():
    # pooled_reg_view="full": the uniformity potential reads the student's mean-pooled read of each whole
    # document (what retrieval embeds), not its pooled visible context; the sentence loss is unchanged
    kwargs = dict(token_loss_weight=0.0, sentence_loss_weight=1.0, pooled_head="identity", pooled_reg="uniformity",
                  pooled_reg_weight=0.2, uniformity_t=10.0)
    batch = two_document_rows()
    model = make_model(pooled_reg_view="full", **kwargs)
    with torch.no_grad():
        alone = []  # each document encoded as a text of its own, positions from 0
        for row in range(2):
            for segment in range(2):
                tokens = batch["input_ids"][row:row + 1, batch["segment_ids"][row] == segment]
                alone.append(model.textjepa(tokens).last_hidden_state.mean(dim=1)[0])
    out = model(**batch)
    torch.testing.assert_close(out.loss_terms["pooled_reg"], uniformity_loss(torch.stack(alone), 10.0),
                               rtol=1e-5, atol=1e-5)
    context_view = make_model(**kwargs)(**batch)
    torch.testing.assert_close(out.loss_terms["sentence_loss"], context_view.loss_terms["sentence_loss"])
    assert not torch.isclose(out.loss_terms["pooled_reg"], context_view.loss_terms["pooled_reg"])
    out.loss.backward()
    assert model.textjepa.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(Exception, match="pooled_reg_view"):
        TextJepaConfig(**tiny_config_kwargs(pooled_reg_view="whole"))
    with pytest.raises(Exception, match="pooled_reg_view: 'full' has no effect"):
        TextJepaConfig(**tiny_config_kwargs(pooled_reg_view="full", cross_view_target="student",
                                            cross_view_loss_weight=1.0))


def test_bank_pushes_each_student_vector_from_the_teachers_documents_of_earlier_batches():
    # pooled_reg_bank=Q: the uniformity potential's mean also runs over (student vector, queued vector) pairs,
    # the queue holding the teacher's unit-length pooled segments of earlier training batches (first in, first out)
    torch.manual_seed(0)
    x, bank = (torch.nn.functional.normalize(torch.randn(n, 8), dim=-1) for n in (5, 3))
    pairs = [(x[i] - x[j]).pow(2).sum() for i in range(5) for j in range(i + 1, 5)]
    pairs += [(x[i] - bank[q]).pow(2).sum() for i in range(5) for q in range(3)]
    torch.testing.assert_close(uniformity_loss(x, 10.0, bank), torch.stack(pairs).mul(-10.0).exp().mean().log())
    torch.testing.assert_close(uniformity_loss(x, 10.0, bank[:0]), uniformity_loss(x, 10.0))

    kwargs = dict(token_loss_weight=0.0, sentence_loss_weight=1.0, pooled_head="identity", pooled_reg="uniformity",
                  pooled_reg_weight=0.2, uniformity_t=10.0)
    batch = two_document_rows()  # 4 documents
    model = make_model(pooled_reg_bank=6, **kwargs)
    first = model(**batch)  # an empty queue: the batch alone, as without a bank
    torch.testing.assert_close(first.loss_terms["pooled_reg"], make_model(**kwargs)(**batch).loss_terms["pooled_reg"])
    student, teacher = student_and_teacher_pooled(model, batch)
    queued = torch.nn.functional.normalize(teacher.reshape(4, -1), dim=-1)
    assert int(model.pooled_bank_seen) == 4
    torch.testing.assert_close(model.pooled_bank[:4], queued)
    second = model(**batch)
    expected = uniformity_loss(student.pooled[student.has], 10.0, queued)
    torch.testing.assert_close(second.loss_terms["pooled_reg"], expected)
    assert not torch.isclose(second.loss_terms["pooled_reg"], first.loss_terms["pooled_reg"])
    second.loss.backward()  # the queue was overwritten in place after the term read it
    assert model.textjepa.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert int(model.pooled_bank_seen) == 8  # slots 4, 5, then round to 0, 1
    torch.testing.assert_close(model.pooled_bank[[4, 5, 0, 1]], queued)
    model.eval()
    model(**batch)  # evaluation passes leave the queue alone
    assert int(model.pooled_bank_seen) == 8
    restored = make_model(seed=1, pooled_reg_bank=6, **kwargs)  # a checkpoint carries the queue
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.pooled_bank, model.pooled_bank) and int(restored.pooled_bank_seen) == 8
    with pytest.raises(Exception, match="pooled_reg_bank: a bank holds"):
        TextJepaConfig(**tiny_config_kwargs(pooled_reg_bank=8))
    with pytest.raises(Exception, match="pooled_reg_bank: expected a number >= 0"):
        TextJepaConfig(**tiny_config_kwargs(pooled_reg_bank=-1, **kwargs))


def test_a_student_bank_queues_the_guarded_student_vectors_and_moves_with_them():
    # pooled_reg_bank_source="student": the queue holds the student's own guarded vectors of earlier batches
    # (detached), not the teacher's, so moving every vector away from fixed ones cannot lower the potential
    kwargs = dict(token_loss_weight=0.0, sentence_loss_weight=1.0, pooled_head="identity", pooled_reg="uniformity",
                  pooled_reg_weight=0.2, uniformity_t=10.0, pooled_reg_bank=6, pooled_reg_bank_source="student")
    batch = two_document_rows()  # 4 documents
    model = make_model(**kwargs)
    model(**batch)
    student, teacher = student_and_teacher_pooled(model, batch)
    queued = torch.nn.functional.normalize(student.pooled[student.has].detach(), dim=-1)
    assert int(model.pooled_bank_seen) == len(queued) == 4
    torch.testing.assert_close(model.pooled_bank[:4], queued)
    assert not torch.allclose(queued, torch.nn.functional.normalize(teacher.reshape(4, -1), dim=-1))
    second = model(**batch)
    torch.testing.assert_close(second.loss_terms["pooled_reg"], uniformity_loss(student.pooled[student.has], 10.0,
                                                                                 queued))
    second.loss.backward()
    assert model.textjepa.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # the student's own queue needs no teacher target; the teacher's does
    alone = make_model(**{**kwargs, "sentence_loss_weight": 0.0, "token_loss_weight": 1.0})
    assert torch.isfinite(alone(**batch).loss) and int(alone.pooled_bank_seen) == 4
    with pytest.raises(Exception, match="pooled_reg_bank: a bank of the teacher's sentence vectors needs"):
        TextJepaConfig(**tiny_config_kwargs(**{**kwargs, "sentence_loss_weight": 0.0,
                                               "pooled_reg_bank_source": "teacher"}))
    with pytest.raises(Exception, match="pooled_reg_bank_source"):
        TextJepaConfig(**tiny_config_kwargs(**{**kwargs, "pooled_reg_bank_source": "both"}))


def test_the_guard_backs_off_while_the_student_drifts_past_the_budget():
    # pooled_reg_drift_budget: after each training step the guard's weight scale becomes
    # min(1, scale * exp(budget - sentence_loss)); the loss uses the scale from before the step
    kwargs = dict(token_loss_weight=0.0, sentence_loss_weight=1.0, pooled_head="identity", pooled_reg="uniformity",
                  pooled_reg_weight=0.2, uniformity_t=10.0)
    batch = two_document_rows()
    plain = make_model(**kwargs)
    model = make_model(pooled_reg_drift_budget=1e-4, **kwargs)  # every sentence loss is over it
    first, reference = model(**batch), plain(**batch)
    assert torch.equal(first.loss, reference.loss) and float(first.pooled_reg_scale) == 1.0
    over = float(first.loss_terms["sentence_loss"]) - 1e-4
    assert over > 0
    torch.testing.assert_close(model.pooled_reg_scale, torch.tensor(math.exp(-over)))
    second = model(**batch)
    terms = second.loss_terms
    torch.testing.assert_close(second.loss, terms["sentence_loss"] + 0.2 * math.exp(-over) * terms["pooled_reg"])
    second.loss.backward()
    model.eval()
    scale = model.pooled_reg_scale.clone()
    model(**batch)  # evaluation leaves the scale alone
    assert torch.equal(model.pooled_reg_scale, scale) and "pooled_reg_scale" in model.state_dict()
    roomy = make_model(pooled_reg_drift_budget=5.0, **kwargs)  # never over: the scale stays 1, the loss the plain one
    for _ in range(2):
        assert torch.equal(roomy(**batch).loss, plain(**batch).loss)
    assert float(roomy.pooled_reg_scale) == 1.0
    with pytest.raises(Exception, match="pooled_reg_drift_budget: the budget backs the guard off"):
        TextJepaConfig(**tiny_config_kwargs(pooled_reg_drift_budget=0.3))
    with pytest.raises(Exception, match="pooled_reg_drift_budget: expected a number >= 0"):
        TextJepaConfig(**tiny_config_kwargs(pooled_reg_drift_budget=-0.1, **kwargs))


def test_pieces_of_one_document_are_not_pushed_apart():
    # pooled_reg_skip_same_document: a document longer than a block is cut into pieces in neighbouring blocks;
    # the uniformity potential leaves out the pairs of one document, in the batch and against the queue
    torch.manual_seed(0)
    x, bank = (torch.nn.functional.normalize(torch.randn(n, 8), dim=-1) for n in (4, 3))
    documents, bank_documents = torch.tensor([5, 6, 6, 7]), torch.tensor([7, 8, 5])
    pairs = [(x[i] - x[j]).pow(2).sum() for i in range(4) for j in range(i + 1, 4) if documents[i] != documents[j]]
    pairs += [(x[i] - bank[q]).pow(2).sum() for i in range(4) for q in range(3) if documents[i] != bank_documents[q]]
    assert len(pairs) == 5 + 10  # of 6 + 12
    torch.testing.assert_close(uniformity_loss(x, 10.0, bank, documents, bank_documents),
                               torch.stack(pairs).mul(-10.0).exp().mean().log())
    # every document its own: exactly the plain potential
    distinct = uniformity_loss(x, 10.0, bank, torch.arange(4), torch.arange(4, 7))
    assert torch.equal(distinct, uniformity_loss(x, 10.0, bank))

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, 97, (2, 32), generator=generator)
    blocks[0, 11], blocks[1, 20] = SEP, SEP  # row 0: documents 5, 6; row 1 goes on with 6, then 7
    collator = SpanMaskCollator(MaskingConfig(target_ratio=0.25, num_spans=2, views="documents",
                                              separator_token_id=SEP, special_token_ids=(0, 1, SEP)), seed=0)
    batch = collator([{"input_ids": row, "first_document": first} for row, first in zip(blocks, (5, 6))])
    assert batch["document_ids"][:, [0, 31]].tolist() == [[5, 6], [6, 7]]
    kwargs = dict(token_loss_weight=0.0, sentence_loss_weight=1.0, pooled_head="identity", pooled_reg="uniformity",
                  pooled_reg_weight=0.2, uniformity_t=10.0, pooled_reg_bank=6)
    model = make_model(pooled_reg_skip_same_document=True, **kwargs)
    first = model(**batch)
    student, teacher = student_and_teacher_pooled(model, batch)
    assert student.has.all()
    vectors = student.pooled[student.has]  # (4, H): documents 5, 6, 6, 7
    torch.testing.assert_close(first.loss_terms["pooled_reg"], uniformity_loss(vectors, 10.0, None, documents))
    plain = make_model(**kwargs)(**batch).loss_terms["pooled_reg"]  # the same batch, the pair of 6's kept
    torch.testing.assert_close(plain, uniformity_loss(vectors, 10.0))
    assert not torch.isclose(plain, first.loss_terms["pooled_reg"])
    assert model.pooled_bank_documents[:4].tolist() == [5, 6, 6, 7]
    second = model(**batch)  # every queued vector is the teacher's read of one of the batch's own documents
    queued = torch.nn.functional.normalize(teacher.reshape(4, -1), dim=-1)
    torch.testing.assert_close(second.loss_terms["pooled_reg"],
                               uniformity_loss(vectors, 10.0, queued, documents, documents))
    with pytest.raises(ValueError, match="pooled_reg_skip_same_document needs the batch's document_ids"):
        model(**{k: v for k, v in batch.items() if k != "document_ids"})
    with pytest.raises(Exception, match="pooled_reg_skip_same_document: only the uniformity potential"):
        TextJepaConfig(**tiny_config_kwargs(pooled_reg="vicreg", pooled_reg_skip_same_document=True))


def test_infonce_sentence_loss_picks_the_own_segment_among_every_segment_of_the_batch():
    # sentence_loss_type="infonce": row (b, s) of the student's pooled vectors is scored against the teacher's
    # pooled vector of every segment the teacher saw in the batch; its own segment is the right answer
    model = make_model(token_loss_weight=0.0, sentence_loss_weight=1.0, pooled_head="identity",
                       sentence_loss_type="infonce", sentence_temperature=0.1)
    batch = two_document_rows()
    out = model(**batch)
    student, teacher = student_and_teacher_pooled(model, batch)
    assert student.has.all()  # 2 rows x 2 segments: 4 candidates, row-major
    cosines = torch.nn.functional.cosine_similarity(student.pooled.reshape(4, 1, -1), teacher.reshape(1, 4, -1),
                                                    dim=-1)  # (4, 4)
    expected = -torch.log_softmax(cosines / 0.1, dim=1).diagonal().mean()
    torch.testing.assert_close(out.loss_terms["sentence_loss"], expected)
    # the other segments are what makes it differ from the cosine form
    cosine_model = make_model(token_loss_weight=0.0, sentence_loss_weight=1.0, pooled_head="identity")
    assert not torch.isclose(cosine_model(**batch).loss_terms["sentence_loss"], expected)


def document_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(3, 97, (3, 32), generator=generator)
    blocks[0, 11], blocks[1, 20], blocks[1, 25] = SEP, SEP, SEP
    config = MaskingConfig(target_ratio=0.25, num_spans=2, views="document_halves", separator_token_id=SEP,
                           special_token_ids=(0, 1, SEP))
    return SpanMaskCollator(config, seed=seed)([{"input_ids": row} for row in blocks])


def test_document_halves_keep_segments_apart_and_pair_the_halves():
    model = make_model(cross_view_loss_weight=1.0, sentence_loss_weight=1.0, span_loss_weight=1.0,
                       bottleneck_loss_weight=1.0, pooled_reg="vicreg", pooled_reg_weight=0.1)
    batch = document_batch()
    assert batch["segment_ids"].shape == batch["position_ids"].shape == (3, 32)
    # the teacher reads each segment as a text of its own: the same numbers as encoding it alone
    segment = batch["segment_ids"][1] == 2  # second document piece of row 1, first half
    alone = model.teacher(batch["input_ids"][1:2, segment]).last_hidden_state.mean(dim=1)
    _, pooled = model.compute_targets(batch["input_ids"], return_sentence=True, segment_ids=batch["segment_ids"],
                                      position_ids=batch["position_ids"])
    torch.testing.assert_close(pooled[1, 2], alone[0], rtol=1e-5, atol=1e-5)
    out = model(**batch)
    assert set(out.loss_terms) == {"token_loss", "span_loss", "sentence_loss", "cross_view_loss", "bottleneck_loss",
                                   "pooled_reg"}
    assert all(torch.isfinite(v) for v in out.loss_terms.values())
    out.loss.backward()
    assert model.view_predictor[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    # a change inside one segment moves no other segment's teacher embedding
    changed = batch["input_ids"].clone()
    changed[1, segment] = 50
    _, pooled_changed = model.compute_targets(changed, return_sentence=True, segment_ids=batch["segment_ids"],
                                              position_ids=batch["position_ids"])
    others = torch.ones(pooled.shape[:2], dtype=torch.bool)
    others[1, 2] = False
    torch.testing.assert_close(pooled_changed[others], pooled[others])
    assert not torch.allclose(pooled_changed[1, 2], pooled[1, 2])


def test_context_loss_regresses_the_teachers_targets_at_the_visible_tokens():
    model = make_model(context_loss_weight=1.0, token_loss_weight=0.0, sentence_loss_weight=0.0)
    batch, _ = view_batch(batch=4, length=32)
    batch.pop("same_document")  # no cross-view pairs: the context term alone
    out = model(**batch)
    assert set(out.loss_terms) == {"context_loss"} and out.predictions is None
    # known answer: the teacher's full-text targets gathered at the student's visible positions
    context_idx = batch["context_idx"][:, 0]  # (B, Nc): one mask per segment, 8 segments of 16 tokens
    rows = torch.arange(8)[:, None]
    expected_targets = model.compute_targets(batch["input_ids"])[rows, context_idx]
    student = model.textjepa(batch["input_ids"][rows, context_idx], position_ids=context_idx).last_hidden_state
    expected = model.compute_loss(model.context_predictor(student), expected_targets)
    torch.testing.assert_close(out.loss_terms["context_loss"], expected.detach())
    out.loss.backward()
    for module in (model.textjepa.embeddings.word_embeddings, model.context_predictor):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_context_loss_is_zero_when_the_student_reads_what_the_teacher_reads():
    # every token visible, targets = the teacher's raw last layer, identity head: student == teacher at init
    model = make_model(context_loss_weight=1.0, token_loss_weight=0.0, sentence_loss_weight=0.0,
                       target_num_layers=1, target_norm="none")
    with torch.no_grad():
        model.context_predictor.weight.copy_(torch.eye(model.config.hidden_size))
        model.context_predictor.bias.zero_()
    input_ids = torch.randint(3, 97, (2, 16))
    everything = torch.arange(16).expand(2, 16)
    out = model(input_ids, context_idx=everything, target_idx=everything[:, :2])
    assert out.loss_terms["context_loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_loss_terms_is_the_one_list_of_what_the_model_emits_in_its_summing_order():
    # the trainer logs the names in objectives.LOSS_TERMS: a term the model emits outside it would go unlogged
    from textjepa.objectives import LOSS_TERM_NAMES, LOSS_TERMS

    for term in LOSS_TERMS:
        for field in (f"{term.name}_weight", *term.shaped_by):
            assert field in TextJepaConfig.__dataclass_fields__, (term.name, field)
    model = make_model(cross_view_loss_weight=1.0, sentence_loss_weight=1.0, span_loss_weight=1.0,
                       bottleneck_loss_weight=1.0, context_loss_weight=1.0, pooled_reg="uniformity",
                       pooled_reg_weight=0.1)
    emitted = list(model(**document_batch()).loss_terms)
    assert emitted == list(LOSS_TERM_NAMES)  # every term on: all of them, in the order they are summed
