"""Tokenizer + packed blocks for a recipe, and the deterministic stream of micro-batches.

Micro-batch i of a run is a pure function of (seed, i, rank): which blocks it holds and how each
block is masked never depend on the RNG history. That is what makes resume exact (start the stream
at micro-batch s * grad_accum) and lets 1 process x batch 2b, 2 processes x b, and 2 accumulation
steps x b see the same samples with the same masks.

Sample order: the training blocks are shuffled once per epoch with a generator seeded by
(seed, epoch); an epoch is the largest multiple of the global batch (batch_size * grad_accum *
num_processes) that fits, the rest of the epoch's permutation is skipped. Masks: each block gets its
own generator seeded by (seed, epoch, block index), for the JEPA span collator and for the MLM collator.

data.streaming: StreamedMicroBatches lays out a stream of blocks the same way (its docstring says what
differs: the order within an epoch, and how resume finds its place).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textjepa.corpus import QUICKSTART_NAME, quickstart_text_file

logger = logging.getLogger(__name__)

# tokenizer.json + tokenizer_config.json sit flat in textjepa/corpus (package-data glob "corpus/*")
SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "corpus"


def text_source(source: str, output_dir: Path) -> str:
    """A file or glob; "quickstart" is the corpus shipped in textjepa/corpus, decompressed once beside the run."""
    return str(quickstart_text_file(output_dir / "data")) if source == QUICKSTART_NAME else source


def _sources(recipe, output_dir: Path) -> list[str]:
    sources = recipe.data.source if isinstance(recipe.data.source, list) else [recipe.data.source]
    return [text_source(s, output_dir) for s in sources]


def resolve_tokenizer(recipe, output_dir: Path, is_main: bool):
    """data.tokenizer: a directory; "quickstart" (the tokenizer shipped with the corpus); or null:
    reuse <output_dir>/tokenizer, else train one there on the recipe's source (main process only;
    callers run this under main_process_first)."""
    from textjepa.data import load_tokenizer

    data = recipe.data
    if recipe.model.init_from:
        return _start_tokenizer(recipe)
    if data.tokenizer == QUICKSTART_NAME:
        return load_tokenizer(SHIPPED_TOKENIZER)
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    trained_dir = output_dir / "tokenizer"
    if (trained_dir / "tokenizer.json").is_file():  # trained by an earlier session of this run
        tokenizer = load_tokenizer(trained_dir)
        if len(tokenizer) > data.vocab_size:  # fewer: the corpus could not fill data.vocab_size (warned then)
            raise ValueError(f"{trained_dir} has {len(tokenizer)} tokens but data.vocab_size is {data.vocab_size}; "
                             "delete it (or use --set train.overwrite=true) to train a new one")
        return tokenizer
    if not is_main:
        raise RuntimeError(f"{trained_dir}: tokenizer missing after the main process trained it")
    from textjepa.tokenization import train_tokenizer

    logger.info("training a %s tokenizer (vocab %d) on %s", data.tokenizer_model, data.vocab_size, data.source)
    train_tokenizer(_sources(recipe, output_dir), data.vocab_size, model=data.tokenizer_model,
                    output_dir=str(trained_dir), text_column=data.text_column,
                    model_max_length=data.block_size)
    return load_tokenizer(trained_dir)


def _start_tokenizer(recipe):
    """model.init_from's own tokenizer; a data.tokenizer with another vocabulary is an error (the embeddings
    are indexed by the checkpoint's ids)."""
    from textjepa.conversion import read_start
    from textjepa.data import load_tokenizer

    start_dir = read_start(recipe.model.init_from).transformer_dir
    tokenizer = load_tokenizer(start_dir)
    given = recipe.data.tokenizer
    if given and (given == QUICKSTART_NAME or load_tokenizer(given).get_vocab() != tokenizer.get_vocab()):
        raise ValueError(f"data.tokenizer: {given} is not the tokenizer of model.init_from ({start_dir}); leave "
                         "data.tokenizer null to use the checkpoint's own")
    return tokenizer


BLOCK_COLUMNS = ("input_ids", "first_document")  # what a micro-batch reads of each packed block


def load_blocks(recipe, tokenizer, output_dir: Path):
    """(train, valid) datasets of block_size ids, numpy-formatted; valid may be None. With
    data.streaming, IterableDatasets that read, tokenize and pack the source as they are iterated."""
    import datasets

    data = recipe.data
    if data.packed_path:
        loaded = datasets.load_from_disk(data.packed_path)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"data.packed_path {data.packed_path}: DatasetDict without a 'train' split "
                                 f"(has {list(loaded)})")
            train = loaded["train"]
            valid = next((loaded[k] for k in ("validation", "valid", "test") if k in loaded), None)
        else:
            train, valid = loaded, None
    else:
        from textjepa.data import build_pretraining_datasets

        train, valid = build_pretraining_datasets(
            _sources(recipe, output_dir), tokenizer, data.block_size, text_column=data.text_column,
            validation_fraction=data.validation_fraction, num_proc=data.num_proc, cache_dir=data.cache_dir,
            seed=recipe.train.seed, streaming=data.streaming, source_weights=data.weights)
    if data.streaming:  # IterableDatasets, packed into block_size ids as they are read
        return train.with_format("numpy"), valid.with_format("numpy") if valid is not None else None
    for name, ds in (("train", train), ("validation", valid)):
        if ds is None:
            continue
        if "input_ids" not in ds.column_names:
            raise ValueError(f"{name} blocks have no 'input_ids' column (columns: {ds.column_names})")
        length = len(ds[0]["input_ids"])
        if length != data.block_size:
            raise ValueError(f"{name} blocks hold {length} tokens but data.block_size is {data.block_size} "
                             f"(data.packed_path={data.packed_path})")
    # first_document (textjepa's packer writes it; a data.packed_path of other making may lack it): the views'
    # document_ids, for model.pooled_reg_skip_same_document
    train, valid = (None if ds is None else ds.select_columns([c for c in BLOCK_COLUMNS if c in ds.column_names])
                    .with_format("numpy") for ds in (train, valid))
    return train, valid


def probe_blocks(train, valid, size: int) -> torch.Tensor:
    """A fixed (P, L) batch for the effective-rank figure: the first `size` validation blocks (train
    blocks when there is no validation split)."""
    import datasets

    if isinstance(train, datasets.IterableDataset):  # streamed: read the first blocks
        for source in (valid, train):
            rows = [row["input_ids"] for row in source.take(size)] if source is not None else []
            if rows:
                return torch.as_tensor(np.stack(rows), dtype=torch.long)
    source = valid if valid is not None and len(valid) > 0 else train
    size = min(size, len(source))
    return torch.as_tensor(np.asarray(source[:size]["input_ids"]), dtype=torch.long)


class JepaBatchMaker:
    """(b, L) ids + per-block seeds (+ first documents (b,), when the blocks carry them) -> {input_ids,
    context_idx, target_idx, and the views' tensors} from SpanMaskCollator."""

    def __init__(self, masking_config):
        from textjepa.masking import SpanMaskCollator

        self.collator = SpanMaskCollator(masking_config)

    def __call__(self, ids: np.ndarray, seeds: list[tuple], first_documents: np.ndarray | None = None) -> dict:
        # In a DataLoader worker the collator would reseed itself per worker on its first call (its own
        # stream for plain use), overriding the first block's seed: mark this worker as seen, so masks
        # never depend on data.num_workers.
        info = torch.utils.data.get_worker_info()
        self.collator._worker_key = None if info is None else (info.id, info.seed)
        parts = []
        for i, (row, seed) in enumerate(zip(ids, seeds)):
            self.collator.rng = np.random.default_rng(seed)  # this block's own mask stream
            example = {"input_ids": row.astype(np.int64)}
            if first_documents is not None:
                example["first_document"] = first_documents[i]
            parts.append(self.collator([example]))
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


class MlmBatchMaker:
    """(b, L) ids + per-block seeds -> {input_ids, labels} from HF DataCollatorForLanguageModeling."""

    def __init__(self, tokenizer, mlm_probability: float):
        from transformers import DataCollatorForLanguageModeling

        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability,
                                                        seed=0, return_tensors="pt")

    def __call__(self, ids: np.ndarray, seeds: list[tuple], first_documents=None) -> dict:  # (documents unused)
        parts = []
        for row, seed in zip(ids, seeds):
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
            self.collator.generator, self.collator._generator_pid = generator, os.getpid()
            parts.append(self.collator([torch.as_tensor(row, dtype=torch.long)]))
        return {key: torch.cat([p[key] for p in parts]) for key in ("input_ids", "labels")}


class MicroBatches(torch.utils.data.Dataset):
    """Item i: this process's share (batch_size blocks) of global micro-batch i (see module doc)."""

    def __init__(self, blocks, batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int,
                 make_batch):
        self.blocks, self.batch_size, self.rank, self.seed, self.make_batch = blocks, batch_size, rank, seed, make_batch
        self.global_micro = batch_size * world_size  # blocks per micro-batch over all processes
        global_batch = self.global_micro * grad_accum  # blocks per optimizer step
        self.steps_per_epoch = len(blocks) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(blocks)} blocks, fewer than one global batch of "
                             f"{global_batch} (train.batch_size x train.grad_accum x processes); add data "
                             "or lower the batch")
        self.blocks_per_epoch = self.steps_per_epoch * global_batch
        self._epoch, self._perm = None, None

    def __len__(self):  # one epoch of micro-batches; the sampler decides how many are drawn
        return self.blocks_per_epoch // self.global_micro

    def block_indices(self, i: int) -> tuple[int, np.ndarray]:
        offset = i * self.global_micro + self.rank * self.batch_size  # position in the sample stream
        epoch, start = divmod(offset, self.blocks_per_epoch)
        if epoch != self._epoch:
            self._perm = self.epoch_order(epoch)
            self._epoch = epoch
        return epoch, self._perm[start:start + self.batch_size]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The block indices of `epoch` in the order they are trained on."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))

    def __getitem__(self, i: int) -> dict:
        epoch, indices = self.block_indices(int(i))
        blocks = self.blocks[indices]
        seeds = [(self.seed, epoch, int(k)) for k in indices]
        return self.make_batch(np.asarray(blocks["input_ids"]), seeds, _first_documents(blocks))


def _first_documents(blocks: dict) -> np.ndarray | None:
    """(b,) the packer's first_document of each block, None when the blocks do not carry it."""
    return np.asarray(blocks["first_document"]) if "first_document" in blocks else None


STREAM_NEXT = "stream_next"  # micro-batch key: (epoch, first step of that epoch) the stream goes on at


class StreamedMicroBatches(torch.utils.data.IterableDataset):
    """data.streaming: this process's micro-batches from a stream of packed blocks (an IterableDataset
    that reads, tokenizes and packs the source as it is iterated), from optimizer step first to last.

    Order: an epoch is one pass over the stream, shuffled by datasets' IterableDataset.shuffle with a
    buffer of shuffle_buffer blocks and the seed seed + epoch (it also reorders the files); a buffer of
    0 or 1 keeps the stream's order. The stream is read one optimizer step at a time, global_batch =
    batch_size x grad_accum x processes blocks, laid out as in MicroBatches: micro-batch j of a step holds
    rows j * global_micro + rank * batch_size onwards; the incomplete last step of an epoch is skipped.
    The block at position k of an epoch is masked with the seed (seed, epoch, k).

    Processes: every process reads the whole stream and keeps its rows, so the processes see disjoint
    blocks and N processes x b see what 1 process x N*b sees, as with the Arrow path; the price is that
    every process reads and tokenizes all of it (so does every DataLoader worker; each builds every
    num_workers-th micro-batch). datasets.distributed.split_dataset_by_node would split by files when
    their number divides the process count, else keep every N-th block of the same full read: the blocks
    would then depend on the number of processes and files.

    Resume: each micro-batch carries where the stream goes on after its step (STREAM_NEXT), which
    micro_batch_loader writes into the TrainerState that checkpoints save. A resumed stream re-reads
    that epoch from its start and skips the steps already trained on, by count: exact, at the cost of
    tokenizing the consumed part of the epoch again (no model work). datasets' own state_dict() would
    resume without re-reading but not exactly: it does not keep the shuffle buffer.

    Equality with the Arrow path (tests/test_streaming.py): with shuffle_buffer 0 the stream is the
    packed Arrow dataset of the same source in order, and these micro-batches are those of MicroBatches
    over it with epoch_order the identity, masks included; a run gives the same losses bit for bit.
    No shuffled stream equals the Arrow path's order: a buffer shuffle is not a permutation drawn over
    the whole epoch.
    """

    def __init__(self, blocks, batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int,
                 make_batch, shuffle_buffer: int = 0):
        self.blocks, self.batch_size, self.grad_accum, self.rank = blocks, batch_size, grad_accum, rank
        self.seed, self.make_batch, self.shuffle_buffer = seed, make_batch, shuffle_buffer
        self.global_micro = batch_size * world_size
        self.global_batch = self.global_micro * grad_accum
        self.epoch, self.epoch_start, self.first, self.last = 0, 0, 0, None  # see `between`

    def between(self, epoch: int, epoch_start: int, first: int, last: int) -> "StreamedMicroBatches":
        """A copy that yields the micro-batches of optimizer steps first..last-1, `epoch` (begun at
        step epoch_start) being the epoch that step `first` is in."""
        part = copy.copy(self)
        part.epoch, part.epoch_start, part.first, part.last = epoch, epoch_start, first, last
        return part

    def epoch_steps(self, epoch: int):
        """((global_batch blocks' ids, their first documents or None), whether they are the epoch's last whole
        step) for each step of `epoch`."""
        blocks = self.blocks
        if self.shuffle_buffer > 1:
            blocks = blocks.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
        previous = None
        for batch in blocks.iter(batch_size=self.global_batch, drop_last_batch=True):
            if previous is not None:
                yield previous, False
            previous = np.asarray(batch["input_ids"]), _first_documents(batch)
        if previous is not None:
            yield previous, True

    def steps(self):
        """(epoch, position of the step's first block in the epoch, its blocks (ids, first documents), where
        the stream goes on after it) for the steps first..last-1."""
        epoch, epoch_start = self.epoch, self.epoch_start
        while True:
            step = epoch_start
            for blocks, last_in_epoch in self.epoch_steps(epoch):
                if self.last is not None and step >= self.last:
                    return
                if step >= self.first:
                    after = (epoch + 1, step + 1) if last_in_epoch else (epoch, epoch_start)
                    yield epoch, (step - epoch_start) * self.global_batch, blocks, after
                step += 1
            if step == epoch_start:
                raise ValueError(f"data.streaming: epoch {epoch} of the stream holds fewer blocks than one global "
                                 f"batch of {self.global_batch} (train.batch_size x train.grad_accum x processes)")
            epoch, epoch_start = epoch + 1, step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        count = 0  # micro-batches so far; the DataLoader takes them from its workers in turn
        for epoch, position, blocks, after in self.steps():
            for j in range(self.grad_accum):
                count += 1
                if (count - 1) % workers != worker:
                    continue
                start = j * self.global_micro + self.rank * self.batch_size
                seeds = [(self.seed, epoch, position + start + r) for r in range(self.batch_size)]
                rows = slice(start, start + self.batch_size)
                ids, documents = blocks
                batch = self.make_batch(ids[rows], seeds, None if documents is None else documents[rows])
                batch[STREAM_NEXT] = torch.tensor(after)
                yield batch


def masking_config(recipe, tokenizer):
    """The recipe's mask section as a MaskingConfig (the one place a recipe becomes one): its MaskingConfig
    fields (recipe.mask_config_kwargs, which recipe validation builds too), plus the tokenizer's special ids
    (mask.special_tokens_never_target) and its document separator (needed by views)."""
    from textjepa.masking import MaskingConfig

    from .recipe import mask_config_kwargs

    fields = mask_config_kwargs(recipe)
    if recipe.mask.special_tokens_never_target:
        fields["special_token_ids"] = tuple(tokenizer.all_special_ids)
    if recipe.mask.num_views > 1 or recipe.mask.views != "none":  # views must know document boundaries
        from textjepa.data import separator_token_id

        fields["separator_token_id"] = separator_token_id(tokenizer)
    return MaskingConfig(**fields)


@dataclass
class TrainingData:
    """What the loop reads: the tokenizer, this process's micro-batch stream and the rank probe."""

    tokenizer: object
    micro_batches: MicroBatches | StreamedMicroBatches
    probe_ids: torch.Tensor  # (P, L) fixed blocks for the effective-rank figure
    num_train_blocks: int | None  # None: streamed, not known
    tokens_per_step: int  # over all processes and micro-batches of one optimizer step


def training_data(recipe, accelerator, output_dir: Path) -> TrainingData:
    """Tokenizer, blocks and the micro-batch maker of the recipe's objective. The main process
    tokenizes and caches first, the others then read its cache."""
    from textjepa.data import check_block_size

    data, train = recipe.data, recipe.train
    check_block_size(data.block_size, recipe.model.max_position_embeddings or data.block_size)
    with accelerator.main_process_first():
        tokenizer = resolve_tokenizer(recipe, output_dir, accelerator.is_main_process)
        train_blocks, valid_blocks = load_blocks(recipe, tokenizer, output_dir)
    if recipe.objective == "jepa":
        make_batch = JepaBatchMaker(masking_config(recipe, tokenizer))
    else:
        make_batch = MlmBatchMaker(tokenizer, recipe.mask.mlm_probability)
    layout = (train.batch_size, train.grad_accum, accelerator.process_index, accelerator.num_processes, train.seed,
              make_batch)
    if data.streaming:
        micro_batches = StreamedMicroBatches(train_blocks, *layout, shuffle_buffer=data.shuffle_buffer)
        if len(list(train_blocks.take(micro_batches.global_batch))) < micro_batches.global_batch:
            raise ValueError(f"data.streaming: the stream of {data.source} holds fewer blocks than one global batch "
                             f"of {micro_batches.global_batch} (train.batch_size x train.grad_accum x processes); "
                             "add data or lower the batch")
    else:
        micro_batches = MicroBatches(train_blocks, *layout)
    return TrainingData(
        tokenizer=tokenizer, micro_batches=micro_batches,
        probe_ids=probe_blocks(train_blocks, valid_blocks, recipe.log.probe_size),
        num_train_blocks=None if data.streaming else len(train_blocks),
        tokens_per_step=train.batch_size * train.grad_accum * accelerator.num_processes * data.block_size)


def micro_batch_loader(data: TrainingData, recipe, state, device):
    """The micro-batches from optimizer step state.step (a TrainerState) to train.max_steps, in order.
    A stream starts where `state` says and, as its micro-batches are drawn, writes into `state` where it
    goes on (saved by the next checkpoint)."""
    train = recipe.train
    loader = dict(batch_size=None, num_workers=recipe.data.num_workers, pin_memory=device.type == "cuda",
                  generator=torch.Generator().manual_seed(train.seed))  # never touch the global RNG (exact resume)
    if isinstance(data.micro_batches, StreamedMicroBatches):
        stream = data.micro_batches.between(state.stream_epoch, state.stream_epoch_start, state.step, train.max_steps)
        return _recording_position(torch.utils.data.DataLoader(stream, **loader), state)
    sampler = range(state.step * train.grad_accum, train.max_steps * train.grad_accum)
    return torch.utils.data.DataLoader(data.micro_batches, sampler=sampler, **loader)


def _recording_position(micro_batches, state):
    for batch in micro_batches:
        state.stream_epoch, state.stream_epoch_start = (int(v) for v in batch.pop(STREAM_NEXT))
        yield batch
