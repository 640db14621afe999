"""Exports are self-describing: loaded where textjepa cannot be imported (AutoModel / AutoTokenizer /
AutoModelForSequenceClassification with trust_remote_code, SentenceTransformer), they give the vectors
textjepa's SentenceEncoder gives, with and without shipped whitening."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train import quiet, tiny_data, tiny_recipe  # noqa: F401  (tiny_data is a fixture)
from textjepa.training import loop

TEXTS = ["The old sailor watched the grey sea before dawn.", "A letter", "",
         "My brother carried a broken mast with great care. " * 6]

# The start of a script for a fresh interpreter whose import system refuses textjepa (test_conversion uses it too).
REFUSE_TEXTJEPA = r'''
import importlib.abc, json, sys, warnings
class NoTextjepa(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "textjepa" or name.startswith("textjepa."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoTextjepa())
'''
# Run from a directory outside the repository.
BLOCKED = REFUSE_TEXTJEPA + r'''
try:
    import textjepa
    raise SystemExit("textjepa is importable")
except ModuleNotFoundError:
    pass

import logging
import numpy as np, torch
from safetensors.numpy import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
hf_logging.get_logger().addHandler(Keep())
hf_logging.set_verbosity_warning()

export, texts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
max_length = json.load(open(f"{export}/sentence_bert_config.json"))["max_seq_length"]
with torch.no_grad():
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    try:  # shipped SIF token weights: the weighted mean
        mask = mask * torch.from_numpy(load_file(f"{export}/token_weights.safetensors")["weights"])[batch["input_ids"]][..., None]
    except FileNotFoundError:
        pass
    pooled = ((states * mask).sum(1) / mask.sum(1)).numpy()
try:
    whitening = load_file(f"{export}/whitening.safetensors")
    pooled = (pooled - whitening["mean"]) @ whitening["matrix"]
except FileNotFoundError:
    pass
auto = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

classifier = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True, num_labels=3)
with torch.no_grad():
    logits = classifier.eval()(**batch).logits
assert logits.shape == (len(texts), 3) and torch.isfinite(logits).all()

from sentence_transformers import SentenceTransformer
st = SentenceTransformer(export, trust_remote_code=True, device="cpu")
vectors = st.encode(texts, batch_size=2)
assert "textjepa" not in sys.modules
np.save(sys.argv[3], np.stack([auto, vectors]))
print(json.dumps({"warnings": records, "modules": [m.__class__.__name__ for m in st]}))
'''


def run_blocked(export, tmp_path):
    """(AutoModel's pooled vectors, SentenceTransformer's vectors, transformers' log records, ST modules)."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    copy = workdir / export.name  # a copy: nothing may point back into the run directory
    shutil.copytree(export, copy)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false")
    out = workdir / f"{export.name}.npy"
    result = subprocess.run([sys.executable, "-c", BLOCKED, str(copy), json.dumps(TEXTS), str(out)],
                            capture_output=True, text=True, env=env, cwd=workdir, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    auto, st = np.load(out)
    return auto, st, report["warnings"], report["modules"]


def test_export_loads_without_textjepa_and_matches_sentence_encoder(tiny_data, tmp_path):
    from textjepa.evaluation import SentenceEncoder
    from textjepa.embedding.encoder import whiten_main
    from textjepa.training.export import main as export_main

    run = tmp_path / "run"
    loop.train(tiny_recipe(tiny_data, run, **{"train.max_steps": 4}), announce=quiet)
    plain = tmp_path / "plain"
    assert export_main(["--checkpoint", str(run), "--output", str(plain)]) == 0
    config = json.loads((plain / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_textjepa.TextJepaModel"
    assert (plain / "modeling_textjepa.py").is_file() and (plain / "configuration_textjepa.py").is_file()
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((plain / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling", "Normalize"]

    # `textjepa whiten` adds whitening and the Dense module that applies it; by default SIF token weights
    # too, which sentence-transformers applies with its WordWeights module before the pooling
    whitened, sif = tmp_path / "whitened", tmp_path / "sif"
    for directory, flags in ((whitened, ["--token-weights", "none"]), (sif, [])):
        shutil.copytree(plain, directory)
        assert whiten_main(["--model", str(directory), "--on", tiny_data["corpus"], "--max-docs", "60", *flags]) == 0
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((whitened / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling", "Dense", "Normalize"]
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((sif / "modules.json").read_text())]
    assert kinds == ["Transformer", "WordWeights", "Pooling", "Dense", "Normalize"]

    for export in (plain, whitened, sif):
        ours = SentenceEncoder(str(export)).encode(TEXTS)
        auto, st, warnings, modules = run_blocked(export, tmp_path)
        np.testing.assert_allclose(auto, ours, atol=1e-5, err_msg=f"{export.name}: AutoModel")
        np.testing.assert_allclose(st, ours, atol=1e-5, err_msg=f"{export.name}: SentenceTransformer")
        assert not [w for w in warnings if "to instantiate a model of type" in w], warnings
        assert modules[-1] == "Normalize"
    assert not np.allclose(SentenceEncoder(str(plain)).encode(TEXTS), SentenceEncoder(str(whitened)).encode(TEXTS))
    assert not np.allclose(SentenceEncoder(str(whitened)).encode(TEXTS), SentenceEncoder(str(sif)).encode(TEXTS))


def test_export_sentence_transformer_ships_whitening(tiny_data, tmp_path):
    """export_sentence_transformer copies an encoder directory with the layout; shipped whitening included."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    import textjepa
    from textjepa.evaluation import SentenceEncoder, export_sentence_transformer
    from textjepa.embedding.postprocessing import fit_whitening, save_whitening
    from textjepa.data import load_tokenizer

    model = textjepa.TextJepaModel(textjepa.TextJepaConfig(
        vocab_size=150, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    source = tmp_path / "encoder"
    model.save_pretrained(source)  # a plain save_pretrained: no auto_map, no layout
    load_tokenizer(tiny_data["tokenizer"]).save_pretrained(source)
    raw = SentenceEncoder(str(source)).encode(TEXTS * 5, normalize=False)
    save_whitening(source, *fit_whitening(raw + np.random.default_rng(0).normal(size=raw.shape)))
    out = export_sentence_transformer(source, tmp_path / "st")
    np.testing.assert_allclose(SentenceTransformer(out, device="cpu").encode(TEXTS),
                               SentenceEncoder(str(source)).encode(TEXTS), atol=1e-5)
