"""data.streaming (batches.StreamedMicroBatches): the stream with shuffling off is the packed Arrow dataset in
order, its micro-batches (masks included) and a training run equal the Arrow path's with the identity epoch
order, processes get disjoint blocks, epochs reshuffle, the validation split holds under reshuffled files,
and a resumed streaming run is bit-identical to an uninterrupted one (mid-epoch and at an epoch's end)."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import generated_corpus, losses, quiet, teacher_state, tiny_recipe

from textjepa.data import build_pretraining_datasets, separator_token_id
from textjepa.training import checkpoint as ckpt
from textjepa.training import loop
from textjepa.training.batches import STREAM_NEXT, MicroBatches, StreamedMicroBatches
from textjepa.training.recipe import RecipeError

BLOCK = 32


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """8 documents (41 blocks of 32: 5 steps of 8 blocks per epoch, 1 block left over), a tokenizer, and the
    same blocks packed to Arrow (no validation split)."""
    import datasets

    from textjepa.tokenization import train_tokenizer

    root = tmp_path_factory.mktemp("stream")
    corpus = root / "corpus.txt"
    corpus.write_text(generated_corpus(8))
    train_tokenizer([str(corpus)], 150, model="unigram", output_dir=str(root / "tokenizer"))
    arrow, _ = build_pretraining_datasets(str(corpus), str(root / "tokenizer"), BLOCK, validation_fraction=0)
    datasets.DatasetDict(train=arrow).save_to_disk(str(root / "packed"))
    stream, _ = build_pretraining_datasets(str(corpus), str(root / "tokenizer"), BLOCK, validation_fraction=0,
                                           streaming=True)
    assert len(arrow) == 41
    return {"corpus": str(corpus), "tokenizer": str(root / "tokenizer"), "packed": str(root / "packed"),
            "arrow": arrow.with_format("numpy"), "stream": stream.with_format("numpy"),
            "arrow_ids": np.asarray(arrow.with_format("numpy")[:]["input_ids"]).tolist()}


def ids_and_seeds(ids, seeds, first_documents):
    """A make_batch that keeps what a batch maker is given: the block ids, each block's mask seed and the
    document its first token is from."""
    return {"ids": torch.as_tensor(np.asarray(ids), dtype=torch.long), "seeds": torch.tensor(seeds),
            "documents": torch.as_tensor(first_documents)}


def streamed(small, steps, batch_size=4, grad_accum=1, rank=0, world_size=1, shuffle_buffer=0):
    stream = StreamedMicroBatches(small["stream"], batch_size, grad_accum, rank, world_size, 7, ids_and_seeds,
                                  shuffle_buffer).between(0, 0, 0, steps)
    batches = list(stream)
    for batch in batches:
        batch.pop(STREAM_NEXT)
    return batches


def identity_order(self, epoch):
    return np.arange(len(self.blocks))


@pytest.mark.parametrize("batch_size,grad_accum,world_size", [(4, 1, 1), (3, 2, 2)])
def test_unshuffled_stream_is_the_arrow_path_in_identity_order(small, monkeypatch, batch_size, grad_accum,
                                                               world_size):
    """Over three epochs (each dropping its incomplete last step): the same blocks and mask seeds, micro-batch
    by micro-batch and rank by rank, as MicroBatches over the Arrow blocks with the identity epoch order."""
    assert [row["input_ids"].tolist() for row in small["stream"]] == small["arrow_ids"]
    monkeypatch.setattr(MicroBatches, "epoch_order", identity_order)
    for rank in range(world_size):
        arrow = MicroBatches(small["arrow"], batch_size, grad_accum, rank, world_size, 7, ids_and_seeds)
        steps = 3 * arrow.steps_per_epoch + 1
        stream = streamed(small, steps, batch_size, grad_accum, rank, world_size)
        assert len(stream) == steps * grad_accum
        for i, batch in enumerate(stream):
            expected = arrow[i]
            assert all(torch.equal(batch[key], expected[key]) for key in ("ids", "seeds", "documents")), i


def test_processes_get_disjoint_blocks_and_epochs_reshuffle(small):
    """Shuffled (buffer 8): 2 processes x 2 blocks hold, between them, what 1 process x 4 holds; an epoch's
    blocks are Arrow blocks, each position once; the order differs from the file's and between epochs."""
    steps_per_epoch = len(small["arrow"]) // 4
    one = streamed(small, 2 * steps_per_epoch, batch_size=4, shuffle_buffer=8)
    ranks = [streamed(small, 2 * steps_per_epoch, batch_size=2, rank=r, world_size=2, shuffle_buffer=8)
             for r in range(2)]
    for both, first, second in zip(one, *ranks):
        assert not set(first["seeds"][:, 2].tolist()) & set(second["seeds"][:, 2].tolist())
        assert torch.equal(torch.cat([first["ids"], second["ids"]]), both["ids"])
        assert torch.equal(torch.cat([first["seeds"], second["seeds"]]), both["seeds"])
    epochs = [one[:steps_per_epoch], one[steps_per_epoch:]]
    arrow_blocks = Counter(tuple(row) for row in small["arrow_ids"])
    orders = []
    for epoch, batches in enumerate(epochs):
        seeds = torch.cat([b["seeds"] for b in batches])
        assert (seeds[:, 1] == epoch).all() and seeds[:, 2].tolist() == list(range(4 * steps_per_epoch))
        blocks = [tuple(row) for b in batches for row in b["ids"].tolist()]
        assert not Counter(blocks) - arrow_blocks  # every streamed block is one of the Arrow blocks
        orders.append(blocks)
    assert orders[0] != orders[1] and orders[0] != [tuple(r) for r in small["arrow_ids"][:40]]


def test_streaming_validation_split_holds_under_reshuffled_files(tmp_path, small):
    """Held out by a hash of the text: no document is both validation and training text, whatever order the
    shuffle reads the three files in (a position rule, every n-th document, fails this)."""
    from textjepa.data import load_tokenizer
    from textjepa.training.batches import SHIPPED_TOKENIZER

    for name, count in zip("abc", (41, 37, 43)):  # one-word documents, files of lengths prime to 5
        (tmp_path / f"{name}.txt").write_text("\n\n".join(f"{name}{i}" for i in range(count)) + "\n")
    tokenizer = load_tokenizer(SHIPPED_TOKENIZER)
    sep = separator_token_id(tokenizer)
    train, valid = build_pretraining_datasets(str(tmp_path / "*.txt"), tokenizer, 16, validation_fraction=0.2,
                                              streaming=True)

    def documents(blocks):  # the documents that lie whole inside a block, between two separators
        found = set()
        for row in blocks:
            cuts = np.flatnonzero(np.asarray(row["input_ids"]) == sep)
            found |= {tokenizer.decode(row["input_ids"][a + 1:b]).strip() for a, b in zip(cuts[:-1], cuts[1:])}
        return found

    held_out = documents(valid)
    assert 12 <= len(held_out) <= 36  # about 0.2 of 120
    for seed in range(3):  # the file order a shuffled epoch reads in
        trained = documents(train.shuffle(seed=seed, buffer_size=1))
        assert len(trained) > 60 and not trained & held_out


def streaming_recipe(small, out, **overrides):
    return tiny_recipe({"tokenizer": small["tokenizer"], "packed": None}, out, **{
        "data.source": small["corpus"], "data.streaming": True, "data.validation_fraction": 0, **overrides})


def test_streaming_run_equals_the_arrow_run(small, tmp_path, monkeypatch):
    """Shuffling off, 12 steps of 8 blocks = 2.4 epochs: the same losses and teacher, bit for bit, as the Arrow
    path over the same blocks with the identity epoch order."""
    monkeypatch.setattr(MicroBatches, "epoch_order", identity_order)
    loop.train(streaming_recipe(small, tmp_path / "stream", **{"data.shuffle_buffer": 0}), announce=quiet)
    arrow = tiny_recipe({"tokenizer": small["tokenizer"], "packed": small["packed"]}, tmp_path / "arrow")
    loop.train(arrow, announce=quiet)
    assert sorted(losses(tmp_path / "stream")) == list(range(1, 13))
    assert losses(tmp_path / "stream") == losses(tmp_path / "arrow")
    a, b = (teacher_state(tmp_path / run / "checkpoint-00000012") for run in ("stream", "arrow"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_resume_is_exact(small, tmp_path):
    """Shuffled, 5 steps per epoch: stopped at step 7 (checkpoints 5, at the end of epoch 0, and 7, inside
    epoch 1), resumed from either one to step 12 with 2 loader workers: bit-identical to an uninterrupted run."""
    run = {"data.shuffle_buffer": 8, "train.save_every": 5, "train.keep_last": 2}
    loop.train(streaming_recipe(small, tmp_path / "full", **run), announce=quiet)
    loop.train(streaming_recipe(small, tmp_path / "part", **run, **{"train.stop_after": 7}), announce=quiet)
    states = {step: json.loads((tmp_path / "part" / ckpt.checkpoint_name(step) / ckpt.COMPLETE_MARKER).read_text())
              for step in (5, 7)}
    assert [(s["stream_epoch"], s["stream_epoch_start"]) for s in states.values()] == [(1, 5), (1, 5)]
    shutil.copytree(tmp_path / "part", tmp_path / "from5")
    shutil.rmtree(tmp_path / "from5" / ckpt.checkpoint_name(7))
    full_losses, full_teacher = losses(tmp_path / "full"), teacher_state(tmp_path / "full" / "checkpoint-00000012")
    for resumed in ("part", "from5"):
        loop.train(streaming_recipe(small, tmp_path / resumed, **run, **{"data.num_workers": 2}), resume=True,
                   announce=quiet)
        assert losses(tmp_path / resumed) == full_losses, resumed
        teacher = teacher_state(tmp_path / resumed / "checkpoint-00000012")
        assert all(torch.equal(teacher[k], full_teacher[k]) for k in teacher), resumed


def test_streaming_errors(small, tmp_path):
    with pytest.raises(RecipeError, match=r"data\.packed_path: .*data\.streaming: false.*data\.packed_path: null"):
        tiny_recipe({"tokenizer": small["tokenizer"], "packed": small["packed"]}, tmp_path / "x",
                    **{"data.streaming": True})
    with pytest.raises(RecipeError, match=r"data\.shuffle_buffer: expected a number >= 0, got -1"):
        streaming_recipe(small, tmp_path / "x", **{"data.shuffle_buffer": -1})
    with pytest.raises(ValueError, match="data.streaming: the stream of .* holds fewer blocks than one global "
                                         "batch of 64"):
        loop.train(streaming_recipe(small, tmp_path / "x", **{"train.batch_size": 64}), announce=quiet)
