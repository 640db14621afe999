"""Text-JEPA pretraining: the narrow predictor and the wrapper that holds the student, the predictor, the pooled
heads and the EMA teacher, and composes the loss terms of textjepa.objectives that the config turns on.

Read top to bottom:
  TextJepaPredictor             -- context states + mask tokens at the targets -> estimates of the teacher's states
  TextJepaForPreTrainingOutput  -- loss, the terms by name, collapse diagnostics
  TextJepaForPreTraining        -- the teacher (EMA copy), its targets, the student's read, the loss

The encoder itself (and everything an export needs) is in modeling_textjepa.py; this file is never copied
next to an export.

Shapes: B batch, L full sequence length, K masks per sequence, Nc context tokens, Nt target tokens, S segments
per sequence, H hidden size, Hp predictor width.
"""

import copy
import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .modeling_textjepa import (
    TextJepaLayer,
    TextJepaModel,
    TextJepaPreTrainedModel,
    TextJepaRotaryEmbedding,
    build_attention_mask,
    select_tokens,
)
from .objectives import (
    ResidualPooledHead,
    StudentView,
    bottleneck_loss,
    context_loss,
    normalize_targets,
    per_dimension_std,
    pooled_head,
    pooled_regularizer,
    regression_loss,
    segment_means,
    sentence_loss,
    student_cross_view_loss,
    teacher_cross_view_loss,
    token_terms,
)


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


@dataclass
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
    pooled_reg_scale: torch.Tensor | None = None


class EmaTeacher:
    """The EMA teacher of a pretraining model whose student encoder is `self.textjepa` (mixed into
    TextJepaForPreTraining): a copy of the student that is deliberately *not* a registered submodule: it has
    no gradients, stays out of `parameters()`/`state_dict()` (so DDP and FSDP never wrap it and
    `save_pretrained` cannot mix it up with the student), and is created as a copy of the student the first
    time it is needed. Under FSDP touch `model.teacher` before wrapping (the trainer does): a copy of the
    sharded student is not a plain encoder. Checkpoints carry it through `teacher_state_dict()` /
    `load_teacher_state_dict()`; `compute_targets` is its pass over the full text; `export_encoder` writes it
    (or the student) as a plain encoder.
    """

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


def _world_size():
    """How many training processes share this model (1 without torch.distributed)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


@torch.no_grad()
def _mean_over_processes(value):
    """() -> (): the mean of value over the training processes (itself with one)."""
    if _world_size() == 1:
        return value
    total = value.clone()
    torch.distributed.all_reduce(total)  # a sum: gloo has no AVG
    return total / _world_size()


@torch.no_grad()
def _gather_from_processes(vectors, documents):
    """vectors (D_p, H) and documents (D_p,) of each process -> (sum D_p, H), (sum D_p,), in rank order, the same
    on every process. D_p differs between processes (each batch holds its own number of segments), so the counts
    go first (one host sync, only with several processes) and the rows travel padded to the largest."""
    world = _world_size()
    if world == 1:
        return vectors, documents
    count = torch.tensor([len(vectors)], device=vectors.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded_vectors = vectors.new_zeros(max(counts), vectors.shape[1])
    padded_vectors[:len(vectors)] = vectors
    padded_documents = documents.new_full((max(counts),), -1)
    padded_documents[:len(documents)] = documents
    all_vectors = [torch.empty_like(padded_vectors) for _ in range(world)]
    all_documents = [torch.empty_like(padded_documents) for _ in range(world)]
    torch.distributed.all_gather(all_vectors, padded_vectors)
    torch.distributed.all_gather(all_documents, padded_documents)
    return (torch.cat([v[:n] for v, n in zip(all_vectors, counts)]),
            torch.cat([d[:n] for d, n in zip(all_documents, counts)]))


class TextJepaForPreTraining(EmaTeacher, TextJepaPreTrainedModel):
    """Student encoder (`self.textjepa`), predictor, pooled heads and the EMA teacher (EmaTeacher); forward
    composes the loss terms of textjepa.objectives that the config weights above 0.
    """

    def __init__(self, config):
        super().__init__(config)
        self.textjepa = TextJepaModel(config)
        # the student's visible states + mask tokens -> the teacher's states at the hidden tokens; only built when
        # a token term reads it (a module no loss reaches is an error under DDP: its gradient never arrives)
        token_terms = config.token_loss_weight > 0 or config.span_loss_weight > 0
        self.predictor = TextJepaPredictor(config) if token_terms else None
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
        if config.pooled_reg_bank:  # the teacher's (or student's) pooled vectors of earlier batches (Q, H), unit, and
            # how many were ever queued (slot = count % Q); buffers, so checkpoints carry the queue
            self.register_buffer("pooled_bank", torch.zeros(config.pooled_reg_bank, hidden))
            self.register_buffer("pooled_bank_seen", torch.zeros((), dtype=torch.long))
            # (Q,) which document each queued vector is from (-1: not known), for pooled_reg_skip_same_document
            self.register_buffer("pooled_bank_documents", torch.full((config.pooled_reg_bank,), -1, dtype=torch.long))
        if config.pooled_reg_drift_budget:  # () the guard's weight scale, 1 until the student drifts past the budget
            self.register_buffer("pooled_reg_scale", torch.ones(()))
        self.post_init()
        with torch.no_grad():  # residual pooled heads start as the identity (weights loaded later replace this)
            for head in (self.sentence_predictor, self.view_predictor):
                if isinstance(head, ResidualPooledHead):
                    head.mlp[-1].weight.zero_()
                    head.mlp[-1].bias.zero_()
        object.__setattr__(self, "_teacher", None)  # bypass nn.Module registration on purpose

    @torch.no_grad()
    def _init_weights(self, module):
        # the predictor's mask token; `init.*` skip tensors already loaded from a checkpoint (writing `.data`
        # here would silently re-initialise them: the transformers-5 pitfall)
        super()._init_weights(module)
        if isinstance(module, TextJepaPredictor):
            init.normal_(module.mask_token, mean=0.0, std=self.config.initializer_range)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids, context_idx, target_idx, attention_mask=None, segment_ids=None,
                position_ids=None, same_document=None, document_ids=None, return_dict=None, **kwargs):
        # input_ids (B, L); context_idx (B, K, Nc); target_idx (B, K, Nt). From the collator's views:
        #   segment_ids, position_ids (B, L) (masking.views="document_halves"): S segments per row, each
        #     read as a text of its own (attention within it, positions from 0); segments 2d and 2d+1 are
        #     the two halves of one document piece, partners for the cross-view target;
        #   same_document (B,) bool (masking.num_views): rows 2i and 2i+1 are neighbouring segments of one
        #     block and partners when they come from one document;
        #   document_ids (B, L) (masking.views, on blocks packed with their first_document): which document
        #     each token is from; pooled_reg_skip_same_document leaves pairs of one document out of the potential.
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
            predictions, predicted_terms = token_terms(self.predictor, student, targets, self.config)
            terms.update(predicted_terms)
        if self.bottleneck_predictor is not None:
            terms["bottleneck_loss"] = bottleneck_loss(self.bottleneck_predictor, student, targets, self.config)
        if use["context"]:  # the visible tokens, read without the hidden part, against the teacher's full read
            terms["context_loss"] = context_loss(self.context_predictor, student, context_targets, self.config)
        # 4. sentence level: from the pooled visible context of each segment
        if self.sentence_predictor is not None:
            terms["sentence_loss"] = sentence_loss(self.sentence_predictor, student, sentence_targets, teacher_has,
                                                   self.config)
        if use["student_views"]:
            terms["cross_view_loss"], projections = student_cross_view_loss(self.view_predictor, student, same_document)
        elif use["cross_view"]:
            terms["cross_view_loss"] = teacher_cross_view_loss(self.view_predictor, student, sentence_targets,
                                                               teacher_has, same_document)
        # 5. optional guard on the geometry of the pooled student vectors (the segments it saw), or of
        #    their projections in the teacher-free cross-view term
        scale = None  # model.pooled_reg_drift_budget's scale on the guard's weight, this step's
        if self.config.pooled_reg != "none" and self.config.pooled_reg_weight > 0:
            if projections is not None:
                guarded = projections
            elif self.config.pooled_reg_view == "full":  # the student's read of each whole segment (D, H)
                full_states = self.textjepa(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                            segment_ids=segment_ids).last_hidden_state  # (B, L, H)
                full, _ = segment_means(full_states.float(), segments, attention_mask, num_segments)  # (B, S, H)
                guarded = full[teacher_has]
            else:
                guarded = student.pooled[student.has]  # (M, H)
            segment_documents = documents = bank = bank_documents = None
            if self.config.pooled_reg_skip_same_document:  # the document of each guarded vector (M,)
                if document_ids is None:
                    raise ValueError("model.pooled_reg_skip_same_document needs the batch's document_ids: mask.views "
                                     "'documents' or 'document_halves', on blocks packed with 'first_document'")
                # (B, S) the document of each segment (all its tokens share one)
                segment_documents = torch.full((batch, num_segments), -1, dtype=torch.long, device=input_ids.device)
                segment_documents.scatter_(1, segments, document_ids.long())
                if self.config.pooled_reg_view == "full":
                    documents = segment_documents[teacher_has]
                else:
                    documents = segment_documents.repeat_interleave(student.num_masks, dim=0)[student.has]
            if self.config.pooled_reg_bank:  # a copy: the queue changes in place before backward reads it
                filled = min(int(self.pooled_bank_seen), len(self.pooled_bank))
                bank, bank_documents = self.pooled_bank[:filled].clone(), self.pooled_bank_documents[:filled].clone()
                if self.training and self.config.pooled_reg_bank_source == "student":  # the guarded vectors
                    self._enqueue_bank(guarded.detach(), documents)
                elif self.training:  # the teacher's read of this batch's documents joins the queue
                    self._enqueue_bank(sentence_targets[teacher_has],
                                       None if segment_documents is None else segment_documents[teacher_has])
            # (validation blocks number their documents from 0, as the training blocks do: in evaluation a vector
            # may skip a queued one of another document with the same number; rare, and only in the figure)
            terms["pooled_reg"] = pooled_regularizer(guarded, self.config, bank, documents, bank_documents)
            if self.config.pooled_reg_drift_budget:
                scale = self.pooled_reg_scale.clone()  # a copy: the buffer changes in place before backward reads it
                if self.training:  # past the budget the weight shrinks by exp(budget - loss) per step; under it,
                    # it grows back the same way, up to 1 (no host sync: all on the device). Under DDP the loss is
                    # every process's mean, so every process keeps the same scale
                    drift = self.config.pooled_reg_drift_budget - _mean_over_processes(
                        terms["sentence_loss"].detach().float())
                    self.pooled_reg_scale.mul_(drift.exp()).clamp_(max=1.0)
        return self._weighted_output(terms, predictions, targets, projections, student, scale)

    @torch.no_grad()
    def _enqueue_bank(self, vectors, documents=None):
        """vectors (D, H), the teacher's pooled segments of this batch (or the guarded student vectors), and
        their documents (D,) (None: not known), overwrite the queue's oldest slots. Under DDP every process's
        vectors join, in rank order (MoCo's all_gather), so all processes hold one queue, and DDP's copy of the
        buffers from process 0 before each forward changes nothing."""
        size = len(self.pooled_bank)
        if documents is None:
            documents = torch.full((len(vectors),), -1, dtype=torch.long, device=vectors.device)
        vectors, documents = _gather_from_processes(vectors, documents)
        unit = nn.functional.normalize(vectors.float(), dim=-1)[-size:]
        slots = (torch.arange(len(unit), device=unit.device) + self.pooled_bank_seen) % size  # no host sync
        self.pooled_bank[slots] = unit.to(self.pooled_bank.dtype)
        self.pooled_bank_documents[slots] = documents[-size:]
        self.pooled_bank_seen += len(unit)

    def _parts_in_use(self, segment_ids, same_document):
        """Which terms and passes this batch needs: the config's weights, and the views the collator sent."""
        config = self.config
        cross_view = self.view_predictor is not None and (same_document is not None or segment_ids is not None)
        student_views = cross_view and config.cross_view_target == "student"  # LeJEPA-style, no teacher
        if student_views and segment_ids is not None:
            raise ValueError("cross_view_target='student' works on mask.num_views segments, not mask.views")
        tokens = self.predictor is not None  # built only for a token or span term
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
        """The student's pass over the visible tokens of each (sequence, mask): a StudentView of B*K rows."""
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
        return StudentView(states, context_mask, context_positions, context_segments, target_idx, target_positions,
                            target_segments, pooled, counts > 0, num_masks, segmented)

    def _weighted_output(self, terms, predictions, targets, projections, student, pooled_reg_scale=None):
        """The loss: each term times its config.<name>_weight (the guard's also times pooled_reg_scale, when
        given), summed in the order of `terms`."""
        if not terms:
            raise ValueError("TextJepaForPreTraining: every loss term is off (set token_loss_weight, span_loss_weight, "
                             "sentence_loss_weight, cross_view_loss_weight, bottleneck_loss_weight or "
                             "context_loss_weight > 0)")
        reference = predictions if predictions is not None else student.pooled[student.has]
        weights = {name: getattr(self.config, f"{name}_weight") for name in terms}
        if pooled_reg_scale is not None:
            weights["pooled_reg"] = weights["pooled_reg"] * pooled_reg_scale
        return TextJepaForPreTrainingOutput(
            loss=sum(weights[name] * value for name, value in terms.items()),
            predictions=predictions,
            targets=targets,
            target_std=per_dimension_std(targets if targets is not None else projections),
            prediction_std=per_dimension_std(reference),
            token_loss=terms["token_loss"].detach() if "token_loss" in terms else None,
            sentence_loss=terms["sentence_loss"].detach() if "sentence_loss" in terms else None,
            loss_terms={name: value.detach() for name, value in terms.items()},
            pooled_reg_scale=pooled_reg_scale,
        )

    def compute_loss(self, predictions, targets):
        """Regression of predictions onto targets in float32, as config.loss_type says (objectives.regression_loss)."""
        return regression_loss(predictions, targets, self.config)
