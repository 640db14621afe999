"""mteb runs MtebEncoder end to end on a local STS task (no download) and scores it as our suite does."""

import numpy as np
import pytest
import torch

import textjepa
from conftest import make_eval_data_dir
from mteb_local import local_sts_task
from test_evaluation import tokenizer_dir  # noqa: F401  (a fixture)

mteb = pytest.importorskip("mteb")


def test_mteb_evaluate_runs_the_adapter(tokenizer_dir, tmp_path):  # noqa: F811
    from mteb.models.models_protocols import EncoderProtocol
    from transformers import AutoTokenizer

    from textjepa.evaluation.mteb_adapter import MtebEncoder
    from textjepa.evaluation.sts import evaluate_sts_task
    from textjepa.evaluation.tasks import labels_of, load_task_dir, texts_of

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = textjepa.TextJepaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     pad_token_id=tokenizer.pad_token_id)
    export = tmp_path / "export"
    textjepa.TextJepaModel(config).save_pretrained(export)
    tokenizer.save_pretrained(export)
    spec = load_task_dir(make_eval_data_dir(tmp_path / "data") / "eval" / "similar")
    sentences1, sentences2 = texts_of(spec, "test")

    encoder = MtebEncoder(str(export))
    assert isinstance(encoder, EncoderProtocol)
    result = mteb.evaluate(encoder, [local_sts_task(sentences1, sentences2, labels_of(spec, "test"))],
                           cache=None, show_progress_bar=False)
    assert not result.exceptions
    score = result.task_results[0].scores["test"][0]
    ours = evaluate_sts_task(encoder.encoder, spec, "test")["test"]
    assert score["main_score"] == pytest.approx(ours["spearman"] / 100, abs=1e-9)
    assert score["cosine_pearson"] == pytest.approx(ours["pearson"] / 100, abs=1e-6)
    assert result.model_name == "textjepa/export"

    meta = encoder.mteb_model_meta  # mteb's own loading path: ModelMeta(loader=...).load_model()
    assert meta.name == "textjepa/export" and meta.embed_dim == 32 and meta.similarity_fn_name == "cosine"
    loaded = meta.load_model()
    assert isinstance(loaded, MtebEncoder) and loaded.mteb_model_meta.revision == meta.revision
    np.testing.assert_allclose(loaded.encode(sentences1[:3]), encoder.encode([{"text": sentences1[:3]}]), atol=1e-6)
