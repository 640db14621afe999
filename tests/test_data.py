"""Loading (txt/jsonl/parquet/csv, globs, streaming), packing into exact blocks, splits, bad inputs."""

import json

import numpy as np
import pytest
import torch

from textjepa.data import (apply_source_weights, build_pretraining_datasets, check_block_size, load_text_dataset,
                           load_tokenizer, separator_token_id)
from textjepa.masking import MaskingConfig, SpanMaskCollator
from textjepa.tokenization import train_tokenizer

WORDS = ("the a of to in cat dog sat on mat river bank money flows quickly slowly green idea sleeps "
         "furious colour ship whale captain sea storm night day light dark old new tree stone").split()
BLOCK = 32


def make_docs(num_docs, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(5, 40))) + "." for _ in range(num_docs)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus in every format plus a unigram tokenizer trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300)
    (root / "a.txt").write_text("\n\n".join(docs[:150]) + "\n", encoding="utf-8")
    (root / "b.txt").write_text("\n\n\n".join(docs[150:200]) + "\n\n", encoding="utf-8")  # extra blank lines
    with open(root / "c.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs[200:250]):
            f.write(json.dumps({"id": i, "content": d}) + "\n")
    import datasets

    datasets.Dataset.from_dict({"content": docs[250:], "n": list(range(50))}).to_parquet(str(root / "d.parquet"))
    tokenizer = train_tokenizer(str(root / "a.txt"), vocab_size=100, model="unigram", output_dir=str(root / "tok"))
    return root, docs, tokenizer


def encoded_length(tokenizer, docs):
    """Tokens of docs when each is followed by one separator (what packing consumes)."""
    return sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)


def test_load_txt_paragraphs_lines_and_globs(corpus):
    root, docs, _ = corpus
    ds = load_text_dataset(str(root / "a.txt"))
    assert ds.column_names == ["text"] and ds["text"] == docs[:150]
    # "\n\n\n" separators: paragraphs are stripped, blank ones dropped
    ds = load_text_dataset(str(root / "*.txt"))
    assert ds["text"] == docs[:200]
    lines = load_text_dataset(str(root / "a.txt"), txt_mode="line")
    assert lines["text"] == docs[:150]  # blank lines are counted skips


def test_load_jsonl_parquet_with_text_column_and_mixed_sources(corpus):
    root, docs, _ = corpus
    ds = load_text_dataset(str(root / "c.jsonl"), text_column="content")
    assert ds.column_names == ["text"] and ds["text"] == docs[200:250]
    ds = load_text_dataset(str(root / "d.parquet"), text_column="content")
    assert ds["text"] == docs[250:]
    mixed = load_text_dataset([str(root / "d.parquet"), str(root / "c.jsonl")], text_column="content")
    assert sorted(mixed["text"]) == sorted(docs[200:])


def test_csv_and_streaming(tmp_path, corpus):
    root, docs, _ = corpus
    import csv

    with open(tmp_path / "e.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([[d, 1] for d in docs[:20]])
    assert load_text_dataset(str(tmp_path / "e.csv"))["text"] == docs[:20]
    streamed = load_text_dataset(str(root / "c.jsonl"), text_column="content", streaming=True)
    assert [row["text"] for row in streamed] == docs[200:250]


def test_packing_gives_exact_blocks_and_counts_every_token(corpus):
    root, docs, tokenizer = corpus
    sources = [str(root / "a.txt"), str(root / "c.jsonl")]
    with pytest.raises(KeyError):  # a.txt has "text", c.jsonl has "content": the jsonl part fails
        build_pretraining_datasets(sources, tokenizer, BLOCK, validation_fraction=0)
    train, valid = build_pretraining_datasets(str(root / "a.txt"), tokenizer, BLOCK, validation_fraction=0)
    assert valid is None and train.column_names == ["input_ids", "first_document"]
    blocks = np.array(train["input_ids"])
    assert blocks.shape[1] == BLOCK and blocks.shape[0] > 10
    sep = separator_token_id(tokenizer)
    assert sep == tokenizer.eos_token_id == 2
    assert (blocks == sep).sum() >= 140  # one separator per document (the dropped tail may hold a few)
    assert tokenizer.pad_token_id not in blocks  # packing, not padding
    total = encoded_length(tokenizer, docs[:150])
    # one map batch (150 docs < 1000): only its last partial block is dropped
    assert blocks.size == total - total % BLOCK
    # the stream is the documents in order, each followed by </s>
    first_doc = tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    stream = blocks.ravel().tolist()
    assert stream[: len(first_doc) + 1] == first_doc + [sep]
    # first_document: the document of each block's first token, from the stream of documents written out
    owner = [i for i, d in enumerate(docs[:150])
             for _ in range(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1)]
    assert train["first_document"] == owner[::BLOCK][: len(blocks)]
    assert len(set(train["first_document"])) < len(blocks)  # the corpus has documents longer than a block
    # and through the collator's document views, the document of every token
    collator = SpanMaskCollator(MaskingConfig(views="documents", separator_token_id=sep))
    batch = collator([{"input_ids": row, "first_document": first}
                      for row, first in zip(blocks, train["first_document"])])
    assert batch["document_ids"].ravel().tolist() == owner[: blocks.size]
    halves = SpanMaskCollator(MaskingConfig(views="document_halves", separator_token_id=sep))
    assert torch.equal(halves([{"input_ids": blocks[3], "first_document": train["first_document"][3]}])["document_ids"],
                       batch["document_ids"][3:4])
    assert "document_ids" not in collator([{"input_ids": row} for row in blocks[:2]])  # blocks of other making


def test_validation_by_fraction_by_file_streaming_and_num_proc(corpus):
    root, docs, tokenizer = corpus
    train, valid = build_pretraining_datasets(str(root / "a.txt"), tokenizer, BLOCK, validation_fraction=0.2,
                                              num_proc=2, seed=0)
    total = encoded_length(tokenizer, docs[:150]) // BLOCK
    assert 0.1 < len(valid) / (len(train) + len(valid)) < 0.3
    assert total - 2 <= len(train) + len(valid) <= total  # each split drops at most one partial block
    train_f, valid_f = build_pretraining_datasets(str(root / "a.txt"), tokenizer, BLOCK,
                                                  validation_files=[str(root / "b.txt")])
    assert len(valid_f) == encoded_length(tokenizer, docs[150:200]) // BLOCK
    assert len(train_f) == total
    # documents are numbered over the whole split, whichever of the two processes packed them: piece d of
    # each block is a run of training document first_document + d's tokens (each process drops its own tail)
    train_docs = load_text_dataset(str(root / "a.txt")).train_test_split(test_size=0.2, seed=0)["train"]["text"]
    sep = separator_token_id(tokenizer)
    for row, first in zip(np.array(train["input_ids"]).tolist(), train["first_document"]):
        cuts = [0] + [i + 1 for i, t in enumerate(row) if t == sep]
        pieces = [row[a:b] for a, b in zip(cuts, cuts[1:] + [len(row)]) if a < b]
        for d, piece in enumerate(pieces):
            whole = tokenizer(train_docs[first + d], add_special_tokens=False)["input_ids"] + [sep]
            assert any(whole[i:i + len(piece)] == piece for i in range(len(whole) - len(piece) + 1)), (first, d)
    assert max(train["first_document"]) > 100
    # streaming yields the same blocks as the map-style path
    stream_train, _ = build_pretraining_datasets(str(root / "a.txt"), tokenizer, BLOCK, validation_fraction=0,
                                                 streaming=True)
    assert [row["input_ids"] for row in stream_train] == train_f["input_ids"]
    assert [row["first_document"] for row in stream_train] == train_f["first_document"]
    stream_train, stream_valid = build_pretraining_datasets(str(root / "a.txt"), tokenizer, BLOCK,
                                                            validation_fraction=0.2, streaming=True)
    assert len(list(stream_valid)) > 0 and len(list(stream_train)) > 3 * len(list(stream_valid))


def test_source_weights_resample_training_documents_by_file(corpus):
    root, docs, tokenizer = corpus
    sources = [str(root / "a.txt"), str(root / "c.jsonl")]
    tagged = load_text_dataset(sources, text_column="content", with_source=True)
    assert tagged["source"] == ["a"] * 150 + ["c"] * 50 and tagged["text"] == docs[:150] + docs[200:250]
    # whole weights: a dropped, c twice, in passes (every c document once, then again) so a copy never
    # packs next to itself
    twice = apply_source_weights(tagged, {"a": 0, "c": 2})
    assert twice.column_names == ["text"] and twice["text"] == docs[200:250] * 2
    # a fractional weight keeps that share on average, the same documents for the same seed
    half = apply_source_weights(tagged, {"a": 0.5}, seed=3)
    kept_a = [t for t in half["text"] if t in docs[:150]]
    assert 50 <= len(kept_a) <= 100 and half["text"][-50:] == docs[200:250]
    assert apply_source_weights(tagged, {"a": 0.5}, seed=3)["text"] == half["text"]
    assert apply_source_weights(tagged, {"a": 0.5}, seed=4)["text"] != half["text"]
    with pytest.raises(ValueError, match=r"data.weights: \['b'\] name no source file; the sources are \['a', 'c'\]"):
        apply_source_weights(tagged, {"b": 2})
    with pytest.raises(ValueError, match="keep no document"):
        apply_source_weights(tagged, {"a": 0, "c": 0})
    # through the pipeline: training blocks follow the weights, validation keeps the natural mixture
    plain_train, plain_valid = build_pretraining_datasets(sources, tokenizer, BLOCK, text_column="content",
                                                          validation_fraction=0.2, seed=0)
    train, valid = build_pretraining_datasets(sources, tokenizer, BLOCK, text_column="content",
                                              validation_fraction=0.2, seed=0, source_weights={"c": 3})
    assert valid["input_ids"] == plain_valid["input_ids"]
    assert len(plain_train) < len(train) < 3 * len(plain_train)
    with pytest.raises(ValueError, match="data.weights: not supported with streaming"):
        build_pretraining_datasets(sources, tokenizer, BLOCK, streaming=True, source_weights={"c": 3})


def test_packed_blocks_collate_through_a_dataloader(corpus):
    root, _, tokenizer = corpus
    train, _ = build_pretraining_datasets(str(root / "d.parquet"), str(root / "tok"), BLOCK, text_column="content",
                                          validation_fraction=0)
    collator = SpanMaskCollator(MaskingConfig(num_masks=2, special_token_ids=[separator_token_id(tokenizer)]))
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, collate_fn=collator)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, BLOCK)
    assert batch["target_idx"].shape == (4, 2, round(0.3 * BLOCK))
    assert batch["context_idx"].shape == (4, 2, BLOCK - round(0.3 * BLOCK))
    targets = torch.gather(batch["input_ids"][:, None].expand(-1, 2, -1), 2, batch["target_idx"])
    assert not (targets == separator_token_id(tokenizer)).any()


def test_existing_hf_tokenizer_directory_without_eos_uses_sep(tmp_path):
    # a BERT-style WordPiece directory (like the all-MiniLM vocab): no eos, [SEP] separates documents
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["."])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                            cls_token="[CLS]", mask_token="[MASK]").save_pretrained(tmp_path / "bert")
    tokenizer = load_tokenizer(tmp_path / "bert")
    assert separator_token_id(tokenizer) == 3
    (tmp_path / "x.txt").write_text("\n\n".join(make_docs(40)), encoding="utf-8")
    train, _ = build_pretraining_datasets(str(tmp_path / "x.txt"), tokenizer, 16, validation_fraction=0)
    assert 3 in np.array(train["input_ids"])


def test_bad_inputs_raise_clear_errors(tmp_path, corpus):
    root, _, tokenizer = corpus
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="matched no files"):
        load_text_dataset(str(tmp_path / "*.parquet"))
    (tmp_path / "blank.txt").write_text("\n\n   \n\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_text_dataset(str(tmp_path / "blank.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ok\n\nsecond paragraph".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: bytes at offset 3 are not valid UTF-8"):
        load_text_dataset(str(bad))
    assert load_text_dataset(str(bad), encoding_errors="replace")["text"][0] == "caf\ufffd ok"
    with pytest.raises(KeyError, match=r"'body' not found .* available columns: \['id', 'content'\]"):
        load_text_dataset(str(root / "c.jsonl"), text_column="body")
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "notes.md").write_text("hi")
        load_text_dataset(str(tmp_path / "*.md"))
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        check_block_size(256, 128)
    assert check_block_size(128, 128) == 128
    (tmp_path / "tiny.txt").write_text("cat sat.\n\ndog sat.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="fewer than one block"):
        build_pretraining_datasets(str(tmp_path / "tiny.txt"), tokenizer, 64, validation_fraction=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        build_pretraining_datasets(str(root / "a.txt"), tokenizer, BLOCK, validation_fraction=1.5)
