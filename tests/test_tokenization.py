"""Tokenizer training (unigram, BPE), saving as PreTrainedTokenizerFast, loading back, and the CLI."""

import json

import numpy as np
import pytest

from textjepa.data import load_tokenizer
from textjepa.tokenization import SPECIAL_TOKENS, cli_main, train_tokenizer

WORDS = ("the a of to in cat dog sat on mat river bank money flows quickly slowly green idea sleeps "
         "furious colour ship whale captain sea storm night day light dark old new tree stone").split()


def write_corpus(path, num_docs=120, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        sentences = [" ".join(rng.choice(WORDS, rng.integers(4, 12))).capitalize() + "." for _ in range(3)]
        docs.append(" ".join(sentences))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return docs


@pytest.mark.parametrize("model", ["unigram", "bpe"])
def test_train_save_load_roundtrip(tmp_path, model):
    corpus = tmp_path / "corpus.txt"
    docs = write_corpus(corpus)
    out = tmp_path / f"tok_{model}"
    vocab_size = 120 if model == "unigram" else 300  # byte-level BPE starts from 256 bytes
    tokenizer = train_tokenizer(str(corpus), vocab_size=vocab_size, model=model, output_dir=str(out))
    assert 40 < len(tokenizer) <= vocab_size
    # RoBERTa-like special tokens with fixed ids
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.cls_token, tokenizer.sep_token) == (
        "<s>", "</s>", "<s>", "</s>")
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.mask_token_id) == (1, 3, 4)

    loaded = load_tokenizer(out)
    assert loaded.is_fast and loaded.get_vocab() == tokenizer.get_vocab()
    ids = loaded(docs[0])["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids  # <s> ... </s>, no <unk> on in-domain text
    assert loaded.decode(ids, skip_special_tokens=True).strip() == docs[0]
    pair = loaded(docs[0], docs[1])["input_ids"]
    assert pair.count(2) == 3 and pair[0] == 0  # <s> A </s></s> B </s>
    # whitespace runs are normalised to one space, so indentation does not fill the vocabulary
    assert loaded.tokenize("cat   sat\n\n  on") == loaded.tokenize("cat sat on")


def test_cli_trains_and_writes_a_loadable_directory(tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(1)
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(80):
            f.write(json.dumps({"body": " ".join(rng.choice(WORDS, 10)), "id": 1}) + "\n")
    out = tmp_path / "tok"
    from textjepa.cli import main

    rc = main(["tokenizer", "train", "--source", str(corpus), "--vocab-size", "300", "--model", "bpe",
               "--text-column", "body", "--output", str(out)])
    assert rc == 0
    assert "saved bpe tokenizer" in capsys.readouterr().out
    tokenizer = load_tokenizer(out)
    assert 261 < len(tokenizer) <= 300 and tokenizer.mask_token == "<mask>"


def test_bad_arguments(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, num_docs=5)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(str(corpus), vocab_size=5)
    with pytest.raises(ValueError, match="byte-level BPE needs vocab_size"):
        train_tokenizer(str(corpus), vocab_size=100, model="bpe")
    with pytest.raises(ValueError, match="'unigram' or 'bpe'"):
        train_tokenizer(str(corpus), vocab_size=50, model="wordpiece")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_tokenizer(str(tmp_path / "missing.txt"), vocab_size=50)
    with pytest.raises(SystemExit):
        cli_main(["train", "--source", str(corpus), "--vocab-size", "50", "--model", "wordpiece", "--output", "x"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty_dir")


def test_max_chars_trains_on_a_random_sample_of_documents(tmp_path):
    from textjepa.data import load_text_dataset
    from textjepa.tokenization import sample_documents

    corpus = tmp_path / "corpus.txt"
    docs = write_corpus(corpus, num_docs=200)
    loaded = load_text_dataset(str(corpus))
    total = sum(map(len, docs))
    sample = sample_documents(loaded, max_chars=total // 4, seed=0)
    chars = sum(map(len, sample["text"]))
    assert 0.1 * total < chars < 0.4 * total
    assert sample["text"] != docs[: len(sample)]  # a random subset, not a prefix
    assert set(sample["text"]) <= set(docs)
    assert sample_documents(loaded, max_chars=10 * total) is loaded
    tokenizer = train_tokenizer(str(corpus), vocab_size=80, max_chars=total // 4)
    assert 40 < len(tokenizer) <= 80
