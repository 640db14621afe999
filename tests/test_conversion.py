"""Starting from a pretrained BERT / RoBERTa (model.init_from): exact conversion in and out, the checkpoint's
tokenizer in the data and the collator, named errors, exact resume, an export in the source architecture that
loads where textjepa cannot be imported. Tiny random models made here; no downloads."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_exports import REFUSE_TEXTJEPA
from test_train import generated_corpus, quiet
from textjepa.training import loop
from textjepa.training.recipe import parse_recipe

WORDS = sorted(set(generated_corpus(40).lower().replace(".", " .").split()))


def wordpiece_tokenizer(directory):
    """A BERT WordPiece tokenizer over the generated corpus's words (fixed vocabulary: same ids in every process)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    backend.enable_padding(pad_id=0, pad_token="[PAD]", length=48)  # as a saved sentence-transformers model does
    backend.enable_truncation(48)
    tokenizer = BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                  cls_token="[CLS]", mask_token="[MASK]", model_max_length=64)
    tokenizer.save_pretrained(directory)
    return tokenizer


def bpe_tokenizer(directory):
    """A RoBERTa byte-level BPE tokenizer trained on the generated corpus."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(generated_corpus(40).split("\n"), vocab_size=300,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    from tokenizers import processors

    trainer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = RobertaTokenizerFast(tokenizer_object=trainer._tokenizer, bos_token="<s>", eos_token="</s>",
                                     sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                     mask_token="<mask>", model_max_length=64)
    tokenizer.save_pretrained(directory)
    return tokenizer


def random_source(directory, kind="bert", sentence_transformers=False):
    """A tiny random BertModel / RobertaModel (+ tokenizer), optionally inside a sentence-transformers folder."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    transformer_dir = directory / ("0_Transformer" if sentence_transformers else "")
    transformer_dir.mkdir(parents=True, exist_ok=True)
    if kind == "bert":
        tokenizer = wordpiece_tokenizer(transformer_dir)
        model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     type_vocab_size=2, pad_token_id=0))
    else:
        tokenizer = bpe_tokenizer(transformer_dir)
        model = RobertaModel(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
                                           type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                           layer_norm_eps=1e-5, hidden_act="gelu_new"))
    with torch.no_grad():  # far from init, so a wrong mapping cannot hide behind near-identity LayerNorms
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(transformer_dir)
    if sentence_transformers:
        (directory / "1_Pooling").mkdir()
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
        (directory / "2_Normalize").mkdir()
        (directory / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return model.eval(), tokenizer


def padded_batch(tokenizer):
    texts = ["The old sailor watched the grey sea.", "A stranger praised the long harbour before dawn again.", "At noon."]
    return tokenizer(texts, padding="longest", return_tensors="pt")


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_conversion_is_exact_both_ways(tmp_path, kind):
    from transformers import AutoModel

    from textjepa import TextJepaModel
    from textjepa.conversion import export_in_source_architecture, read_start

    source, tokenizer = random_source(tmp_path / "source", kind)
    batch = padded_batch(tokenizer)
    assert (batch["attention_mask"] == 0).any()  # padding is part of the test
    start = read_start(tmp_path / "source")
    encoder = TextJepaModel(start.textjepa_config()).eval()
    encoder.load_state_dict(start.textjepa_state_dict(), strict=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = source(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        converted = encoder(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert (expected - converted)[real].abs().max() < 1e-5

    start.save_template(tmp_path / "run" / "source")
    export_in_source_architecture(encoder, tmp_path / "run" / "source", tmp_path / "export")
    back = AutoModel.from_pretrained(tmp_path / "export").eval()
    assert type(back) is type(source)
    with torch.no_grad():
        again = back(**batch)
        original = source(**batch)
    assert (again.last_hidden_state - original.last_hidden_state)[real].abs().max() < 1e-5
    assert (again.pooler_output - original.pooler_output).abs().max() < 1e-5  # the untrained pooler kept


def test_sentence_transformers_start_reads_pooling_and_transformer_folder(tmp_path):
    from textjepa.conversion import read_start

    random_source(tmp_path / "st", "bert", sentence_transformers=True)
    start = read_start(tmp_path / "st")
    assert start.transformer_dir == tmp_path / "st" / "0_Transformer"
    assert start.pooling == "mean" and start.layout["normalize"]
    config = start.textjepa_config(predictor_hidden_size=16, predictor_num_attention_heads=2)
    assert (config.norm_placement, config.layer_norm_eps, config.hidden_size, config.max_position_embeddings) == \
        ("post", 1e-12, 32, 64)
    assert config.predictor_hidden_size == 16


def test_unsupported_or_missing_start_is_one_named_line(tmp_path):
    from textjepa.conversion import StartError, read_start

    with pytest.raises(StartError, match="not a directory"):
        read_start(tmp_path / "nowhere")
    deberta = tmp_path / "deberta"
    deberta.mkdir()
    (deberta / "config.json").write_text(json.dumps({"model_type": "deberta-v2"}))
    with pytest.raises(StartError) as err:
        read_start(deberta)
    message = str(err.value)
    assert "deberta-v2" in message and "bert" in message and "roberta" in message and "\n" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(StartError, match="no config.json"):
        read_start(tmp_path / "empty")


def adapt_recipe(tmp_path, start_dir, **overrides):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(generated_corpus(120))
    raw = {
        "model": dict(init_from=str(start_dir), predictor_hidden_size=16, predictor_num_hidden_layers=1,
                      predictor_num_attention_heads=2, target_num_layers=1, sentence_loss_weight=1.0,
                      cross_view_loss_weight=1.0, pooled_head="residual"),
        "data": dict(source=str(corpus), block_size=32, validation_fraction=0.05),
        "mask": dict(views="document_halves", target_ratio=0.25, num_spans=2),
        "optim": dict(lr=1e-3, min_lr=1e-3, warmup_steps=2, weight_decay=0.01),
        "ema": dict(momentum_start=0.99, momentum_end=0.99, schedule="constant"),
        "train": dict(output_dir=str(tmp_path / "run"), max_steps=6, batch_size=4, save_every=1000, threads=1),
        "log": dict(every=1, diag_every=3, probe_size=8, trackers=["jsonl"], plot=False, progress_bar=False, min_rank=0.0,
                    sanity_check=False),
    }
    return parse_recipe(raw, "adapt-test", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def test_collator_and_data_use_the_checkpoints_tokenizer(tmp_path):
    from textjepa.training.batches import masking_config, resolve_tokenizer

    _, tokenizer = random_source(tmp_path / "source", "bert")
    recipe = adapt_recipe(tmp_path, tmp_path / "source")
    resolved = resolve_tokenizer(recipe, tmp_path / "run", True)
    assert resolved.get_vocab() == tokenizer.get_vocab()
    special = set(masking_config(recipe, resolved).special_token_ids)
    assert special == {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id,
                       tokenizer.mask_token_id}
    # the saved tokenizer pads and truncates every text to 48 ids: packing must not inherit that
    from textjepa.data import pack_dataset
    import datasets

    docs = datasets.Dataset.from_dict({"text": ["the old sailor watched the grey sea . " * 12] * 4})
    blocks = np.asarray(pack_dataset(docs, resolved, 32)["input_ids"])
    assert tokenizer.pad_token_id not in blocks and blocks.size > 4 * 48 // 32 * 32 / 2
    other = tmp_path / "other"
    bpe_tokenizer(other.mkdir() or other)
    with pytest.raises(ValueError, match="data.tokenizer: .* is not the tokenizer of model.init_from"):
        resolve_tokenizer(adapt_recipe(tmp_path, tmp_path / "source", **{"data.tokenizer": str(other)}),
                          tmp_path / "run", True)


def test_init_zero_steps_export_gives_back_the_source(tmp_path):
    from transformers import AutoModel

    from textjepa.training.batches import resolve_tokenizer
    from textjepa.training.build import build_model
    from textjepa.training.export import export_model
    from textjepa.conversion import read_start

    source, tokenizer = random_source(tmp_path / "source", "roberta")
    recipe = adapt_recipe(tmp_path, tmp_path / "source")
    model = build_model(recipe, resolve_tokenizer(recipe, tmp_path / "run", True))
    read_start(tmp_path / "source").save_template(tmp_path / "run" / "source")
    export_model(model, recipe, tokenizer, tmp_path / "export", source_template=tmp_path / "run" / "source")
    batch = padded_batch(tokenizer)
    real = batch["attention_mask"].bool()
    with torch.no_grad():  # the teacher is the student is the source
        exported = AutoModel.from_pretrained(tmp_path / "export").eval()(**batch).last_hidden_state
        expected = source(**batch).last_hidden_state
    assert (exported - expected)[real].abs().max() < 1e-5


BLOCKED = REFUSE_TEXTJEPA + r'''
import numpy as np, torch
from transformers import AutoModel, AutoTokenizer
from sentence_transformers import SentenceTransformer
export, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModel.from_pretrained(export).eval()  # no trust_remote_code
tokenizer = AutoTokenizer.from_pretrained(export)
batch = tokenizer(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    states = model(**batch).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).float()
pooled = ((states * mask).sum(1) / mask.sum(1)).numpy()
pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
st = SentenceTransformer(export, device="cpu")
vectors = st.encode(texts)
assert "textjepa" not in sys.modules
mteb_score = None
try:
    import mteb
except ImportError:
    mteb = None
if mteb is not None:  # mteb's own SentenceTransformer path on a local STS task (no download)
    sys.path.insert(0, sys.argv[3])  # tests/: mteb_local imports no textjepa
    from mteb_local import local_sts_task

    result = mteb.evaluate(st, [local_sts_task(texts, texts[::-1], [1.0, 4.0])], cache=None, show_progress_bar=False)
    assert not result.exceptions, result.exceptions
    mteb_score = result.task_results[0].scores["test"][0]["main_score"]
    assert "textjepa" not in sys.modules
print(json.dumps({"class": type(model).__name__, "max_gap": float(np.abs(vectors - pooled).max()),
                  "modules": [type(m).__name__ for m in st], "mteb": mteb_score}))
'''


def test_adapt_run_exports_source_architecture_loadable_without_textjepa_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from textjepa.training.export import main as export_main

    random_source(tmp_path / "st", "bert", sentence_transformers=True)
    loop.train(adapt_recipe(tmp_path, tmp_path / "st", **{"train.max_steps": 6}), announce=quiet)
    run = tmp_path / "run"
    assert json.loads((run / "export" / "config.json").read_text())["model_type"] == "bert"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run / "export", elsewhere / "export")
    result = subprocess.run([sys.executable, "-c", BLOCKED, str(elsewhere / "export"),
                             json.dumps(["the old sailor watched the grey sea .", "at noon ."]), os.path.dirname(os.path.abspath(__file__))],
                            capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "BertModel" and report["max_gap"] < 1e-5
    assert report["modules"][-1] == "Normalize"
    pytest.importorskip("mteb")
    assert report["mteb"] is not None  # mteb.evaluate ran on the export where textjepa cannot be imported

    # `textjepa export` from the checkpoint alone gives the same weights
    export_main(["--checkpoint", str(run), "--output", str(tmp_path / "again")])
    first, again = load_file(str(run / "export" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)

    # 3 steps + --resume 3 steps == 6 steps, bit for bit
    split = tmp_path / "split"
    split.mkdir()
    loop.train(adapt_recipe(split, tmp_path / "st", **{"train.stop_after": 3}), announce=quiet)
    loop.train(adapt_recipe(split, tmp_path / "st"), resume=True, announce=quiet)
    whole = load_file(str(run / "checkpoint-00000006" / "model.safetensors"))
    resumed = load_file(str(split / "run" / "checkpoint-00000006" / "model.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    from textjepa.conversion import read_start

    start = read_start(tmp_path / "st").textjepa_state_dict()  # and the six steps did move the student
    assert not torch.equal(whole["textjepa.layers.0.attention.qkv.weight"], start["layers.0.attention.qkv.weight"])


def test_adapt_run_with_a_bank_resumes_its_queue_exactly(tmp_path):
    # model.pooled_reg_bank: the queue is a buffer of the model, so accelerate's checkpoint carries it and
    # 3 steps + --resume 3 steps == 6 steps, queue included (16 slots, overwritten several times over), with
    # the documents of its vectors (pooled_reg_skip_same_document: the packer's numbers reach the model)
    from safetensors.torch import load_file

    random_source(tmp_path / "st", "bert")
    bank = {"model.pooled_reg": "uniformity", "model.pooled_reg_weight": 0.2, "model.pooled_reg_bank": 16,
            "model.pooled_reg_skip_same_document": True}
    loop.train(adapt_recipe(tmp_path, tmp_path / "st", **{"train.max_steps": 6}, **bank), announce=quiet)
    split = tmp_path / "split"
    split.mkdir()
    loop.train(adapt_recipe(split, tmp_path / "st", **{"train.stop_after": 3}, **bank), announce=quiet)
    loop.train(adapt_recipe(split, tmp_path / "st", **bank), resume=True, announce=quiet)
    whole = load_file(str(tmp_path / "run" / "checkpoint-00000006" / "model.safetensors"))
    resumed = load_file(str(split / "run" / "checkpoint-00000006" / "model.safetensors"))
    assert int(whole["pooled_bank_seen"]) > 16 and (whole["pooled_bank_documents"] >= 0).all()
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("init_from, expected", [
    ("{tmp}/nowhere", "model.init_from: {tmp}/nowhere: not a directory"),
    ("{tmp}/deberta", "model_type 'deberta-v2' is not supported; expected one of ['bert', 'roberta', 'xlm-roberta']"),
])
def test_cli_names_a_bad_start_in_one_line(tmp_path, capsys, init_from, expected):
    from textjepa.cli import main as cli_main

    (tmp_path / "deberta").mkdir()
    (tmp_path / "deberta" / "config.json").write_text(json.dumps({"model_type": "deberta-v2"}))
    (tmp_path / "corpus.txt").write_text(generated_corpus(20))
    code = cli_main(["train", "--recipe", "adapt", "--set", f"model.init_from={init_from.format(tmp=tmp_path)}",
                     "--set", f"data.source={tmp_path / 'corpus.txt'}", "--set", f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and expected.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err
