"""Train a unigram or BPE tokenizer on the user's corpus and save it as a PreTrainedTokenizerFast directory.

    textjepa tokenizer train --source 'data/*.parquet' --vocab-size 8192 --model unigram --output tok8k

Special tokens are RoBERTa-like so the MLM baseline can share the tokenizer:
    <s>=0 (bos/cls), <pad>=1, </s>=2 (eos/sep), <unk>=3, <mask>=4
Single sequences encode as "<s> A </s>", pairs as "<s> A </s></s> B </s>".

Normalisation: NFKC, then every whitespace run becomes one space (code/rst indentation would otherwise
fill the vocabulary with runs of spaces and newlines). Unigram uses a sentencepiece-style "▁" word
prefix (Metaspace); BPE is byte-level (never <unk>). Training streams the text column in batches
from `datasets`, so 100M+ characters never sit in Python memory at once.
"""

import argparse
import logging
import os
import time

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
SPECIAL_TOKEN_KWARGS = dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
                            pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def iter_text_batches(docs, batch_size=1000):
    """Yield lists of strings from a "text" dataset (map-style or streaming)."""
    for batch in docs.iter(batch_size=batch_size):
        yield batch["text"]


def sample_documents(docs, max_chars, seed=0):
    """A seeded random subset of documents holding about max_chars characters (all of them if fewer).

    Random, not a prefix: corpora are often sorted by source, and a prefix would learn one source's words."""
    import numpy as np

    lengths = np.concatenate([np.fromiter(map(len, b["text"]), dtype=np.int64) for b in docs.iter(batch_size=10000)])
    total = int(lengths.sum())
    if total <= max_chars:
        return docs
    keep = np.random.default_rng(seed).random(len(lengths)) < max_chars / total
    logger.info("training on %d of %d documents (%d of %d characters)", int(keep.sum()), len(lengths),
                int(lengths[keep].sum()), total)
    return docs.select(np.flatnonzero(keep))


def build_tokenizer_backend(model="unigram", lowercase=False):
    """An untrained tokenizers.Tokenizer and its trainer class for `model`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    steps = [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    if model == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    elif model == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
    else:
        raise ValueError(f"tokenizer model must be 'unigram' or 'bpe', got {model!r}")
    tokenizer.normalizer = normalizers.Sequence(steps)
    return tokenizer


def train_tokenizer(sources, vocab_size, model="unigram", output_dir=None, text_column="text",
                    txt_mode="paragraph", lowercase=False, min_frequency=2, max_chars=None,
                    model_max_length=512, show_progress=False, seed=0):
    """Train on `sources` (anything load_text_dataset reads) and return a PreTrainedTokenizerFast.

    vocab_size includes the 5 special tokens. max_chars trains on a seeded random sample of documents
    holding about that many characters (None: everything). Unigram training time grows with the corpus
    (EM over every distinct word): on 2 busy cores the full 115M-character corpus took over 27 minutes
    for unigram 8192 without finishing, so large corpora want a sample of some tens of millions of chars.
    Saved to output_dir when given.
    """
    from tokenizers import pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from textjepa.data import load_text_dataset

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens")
    if model == "bpe" and vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"byte-level BPE needs vocab_size >= {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), "
                         f"got {vocab_size}")
    docs = load_text_dataset(sources, text_column=text_column, txt_mode=txt_mode)
    if max_chars is not None:
        docs = sample_documents(docs, max_chars, seed=seed)
    tokenizer = build_tokenizer_backend(model, lowercase=lowercase)
    if model == "unigram":
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>",
                                          max_piece_length=16, show_progress=show_progress)
    else:
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      min_frequency=min_frequency, show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    start = time.perf_counter()
    tokenizer.train_from_iterator(iter_text_batches(docs), trainer=trainer, length=None)
    logger.info("trained %s tokenizer (vocab %d) on %d documents in %.1fs", model, tokenizer.get_vocab_size(),
                len(docs), time.perf_counter() - start)
    if tokenizer.get_vocab_size() < vocab_size:
        logger.warning("asked for vocab_size=%d but the corpus yields only %d tokens (%s, %d documents): the "
                       "tokenizer is smaller than asked; a larger vocabulary needs more text", vocab_size,
                       tokenizer.get_vocab_size(), model, len(docs))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    if None in ids.values():
        raise RuntimeError(f"trained tokenizer lost special tokens: {ids}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length,
                                   **SPECIAL_TOKEN_KWARGS)
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        fast.save_pretrained(output_dir)
    return fast


def cli_main(argv=None):
    """`textjepa tokenizer train --source ... --vocab-size N --model unigram|bpe --output DIR`."""
    parser = argparse.ArgumentParser(prog="textjepa tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a tokenizer on local files or a hub dataset")
    train.add_argument("--source", nargs="+", required=True, help="files, globs, directories or hub names")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--model", choices=["unigram", "bpe"], default="unigram")
    train.add_argument("--output", required=True, help="directory to write the tokenizer to")
    train.add_argument("--text-column", default="text")
    train.add_argument("--txt-mode", choices=["paragraph", "line", "document"], default="paragraph")
    train.add_argument("--lowercase", action="store_true")
    train.add_argument("--max-chars", type=int, default=None, help="train on a random sample of about this many characters")
    train.add_argument("--model-max-length", type=int, default=512)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    tokenizer = train_tokenizer(args.source, args.vocab_size, model=args.model, output_dir=args.output,
                                text_column=args.text_column, txt_mode=args.txt_mode, lowercase=args.lowercase,
                                max_chars=args.max_chars, model_max_length=args.model_max_length,
                                show_progress=True)
    sample = "The quick brown fox jumps over the lazy dog."
    print(f"saved {args.model} tokenizer, vocab {len(tokenizer)}, to {args.output} "
          f"in {time.perf_counter() - start:.1f}s")
    print(f"example: {tokenizer.tokenize(sample)}")
    return 0
