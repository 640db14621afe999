"""benchmarks/adapt_peers.py: each peer method (SimCSE, TSDAE, MLM) trains a tiny random BERT for two steps
through its library and saves a directory that sentence-transformers and transformers both load."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

WORDS = ("the a cell cells bank river rate rates moon dog fox quick brown lazy jumps over near today "
         "is are of and to in on with by from it that this was for as at be has have not but").split()
TEXTS = ["the quick brown fox jumps over the lazy dog", "the bank rate is up today",
         "cells are in the river", "the moon is near the bank", "a dog was by the river today",
         "rates have not jumps", "this is the cell of a fox", "it has a moon and a river"]


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    """A tiny random BertModel with a WordPiece tokenizer (plain transformers dir) and the same model in
    the sentence-transformers layout (transformer at the top level, mean pooling, normalize)."""
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("adapt_peers")
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    backend.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    plain = root / "plain"
    BertModel(config).save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    transformer = models.Transformer(str(plain))
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    st_dir = root / "st"
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(st_dir))
    return {"plain": plain, "st": st_dir}


def weights(directory):
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


@pytest.mark.parametrize("method,layout", [("simcse", "st"), ("tsdae", "st"), ("mlm", "st"), ("mlm", "plain")])
def test_peer_trains_and_saves_a_loadable_model(starts, tmp_path, method, layout):
    from adapt_peers import PeerTrainer
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, BertModel

    trainer = PeerTrainer(method, starts[layout], lr=1e-3, batch_size=8, warmup_steps=0, max_length=16)
    caller_state = torch.get_rng_state()
    for _ in range(2):
        read = trainer.step(TEXTS)
        assert read > 0 and np.isfinite(trainer.last_loss)
    assert torch.equal(torch.get_rng_state(), caller_state)  # the trainer keeps its own random stream
    assert read == {"simcse": 2 * trainer.text_tokens, "mlm": trainer.text_tokens}.get(method, read)

    out = tmp_path / "snapshot"
    trainer.save(out)
    trainer.save(out)  # a second snapshot over the first
    assert not [p for p in tmp_path.iterdir() if p.name != "snapshot"]  # no temp dirs left beside it
    model = SentenceTransformer(str(out), device="cpu")
    embedding = model.encode(["the quick brown fox"])
    assert np.isfinite(embedding).all() and np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-4)
    assert isinstance(AutoModel.from_pretrained(out), BertModel)

    start, saved = weights(starts["st"]), weights(out)
    assert set(saved) == set(start)  # the plain encoder, pooler included, no head or decoder weights
    assert any(not torch.equal(start[k], saved[k]) for k in start)


def test_unknown_method_is_refused(starts):
    from adapt_peers import PeerTrainer

    with pytest.raises(ValueError, match="simcse"):
        PeerTrainer("bogus", starts["st"])
