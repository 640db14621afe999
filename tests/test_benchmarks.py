"""Smoke tests of the benchmark scripts with a tiny budget: they run end to end and write their
tables. (The real measurements are made by hand, see benchmarks/README.md; never timed in tests.)"""

import json
import sys
from pathlib import Path

import pytest
from conftest import make_eval_data_dir

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(BENCHMARKS))


def test_throughput_smoke(tmp_path, capsys):
    import throughput

    out = tmp_path / "throughput.json"
    throughput.main(["--configs", "h256L4", "--vocabs", "8192", "--precisions", "fp32", "--rounds", "1",
                     "--warmup", "0", "--batch", "2", "--seq", "64", "--no-hf-default", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and rows[0]["ratio_vs_mlm"] > 0 and rows[0]["textjepa_mfu"] > 0
    assert "| h256L4" in capsys.readouterr().out
    assert rows[0]["device"] == "cpu" and rows[0]["flop_ratio"] > 1 and "textjepa_peak_mem_gb" not in rows[0]
    # the textjepa step runs the size's shipped recipe: small.yaml's four views and one mask per teacher pass
    assert (rows[0]["recipe"], rows[0]["views"], rows[0]["num_masks"]) == ("small.yaml", 4, 1)


def test_throughput_batches_and_flops_follow_the_recipe():
    """The collator's batches of a recipe (quickstart: 4 views, 2 masks): B x L blocks become B*4 rows of
    L/4 tokens with K=2 masks each; views cut the attention FLOPs, a token-free objective drops the predictor."""
    import throughput

    from textjepa.training.recipe import load_recipe

    batch = throughput.make_jepa_batches(load_recipe(RECIPES / "quickstart.yaml"), 100, 2, 64, 1)[0]
    assert batch["input_ids"].shape == (8, 16) and batch["context_idx"].shape[:2] == (8, 2)
    assert batch["target_idx"].shape[:2] == (8, 2) and batch["same_document"].shape == (8,)
    model, _ = throughput.build_jepa("h128L4", 100, "sdpa", 64, load_recipe(RECIPES / "quickstart.yaml"))
    config = model.config
    assert (config.hidden_size, config.predictor_hidden_size, config.cross_view_loss_weight) == (128, 64, 3.0)
    one_row = throughput.jepa_step_flops(config, 2, 64, 1, 44, 20)
    assert throughput.jepa_step_flops(config, 8, 16, 1, 11, 5) < one_row  # same tokens, shorter rows
    config.token_loss_weight = config.span_loss_weight = 0.0
    assert throughput.jepa_step_flops(config, 2, 64, 1, 44, 20) < one_row


def test_throughput_flops_and_device_helpers():
    import throughput

    # the last-layer shortcut: all queries = the full formula; fewer queries = fewer FLOPs
    full = throughput.encoder_forward_flops(2, 40, 64, 3, 256)
    assert throughput.encoder_forward_flops(2, 40, 64, 3, 256, last_queries=40) == full
    assert throughput.encoder_forward_flops(2, 40, 64, 3, 256, last_queries=10) < full
    assert throughput.encoder_forward_flops(2, 40, 64, 0, 256, last_queries=10) == 0
    # datasheet peaks: the specific names win over the generic ones
    table = dict(throughput.SPEC_BF16_TFLOPS)
    lookup = lambda name: next(t for key, t in throughput.SPEC_BF16_TFLOPS if key in name)  # noqa: E731
    assert lookup("NVIDIA H100 80GB HBM3") == table["H100"] == 989.0
    assert lookup("NVIDIA H100 PCIe") == 756.0 and lookup("NVIDIA H200") == 989.0
    assert lookup("NVIDIA L40S") == 362.0 and lookup("NVIDIA L4") == 121.0 and lookup("NVIDIA A10G") == 70.0
    assert throughput.spec_bf16_tflops("cpu") == (None, None)
    import torch

    if not torch.cuda.is_available():
        assert throughput.resolve_device("auto").type == "cpu"
        with pytest.raises(SystemExit, match="no GPU"):
            throughput.resolve_device("cuda")


@pytest.mark.slow
def test_compare_pretraining_smoke(tmp_path):
    import compare_pretraining

    corpus = tmp_path / "corpus.txt"
    words = "the whale sea ship captain harpoon crew deck wind storm night day sail boat".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12 + i % 5)) for i in range(400)]
    corpus.write_text("\n\n".join(lines) + "\n")
    out = tmp_path / "compare"
    compare_pretraining.main([
        "--pretrain-data", str(corpus), "--eval-data", str(make_eval_data_dir(tmp_path / "eval")),
        "--out", str(out), "--size", "tiny", "--recipe", str(RECIPES / "quickstart.yaml"), "--minutes", "0.02",
        "--vocab-size", "120", "--calibration-steps", "3", "--skip-minilm",
        "--set", "data.block_size=32", "--set", "mask.num_views=2", "--set", "train.batch_size=4",
        "--set", "log.probe_size=8",
        "--set", "mask.num_masks=1", "--jobs", "2",
        "--finetune", "--finetune-args=--tasks sentiment similar --learning-rates 1e-3 --epochs 1 --bootstrap-resamples 50",
    ])
    report = (out / "results.md").read_text()
    for name in ("textjepa", "mlm", "random-init", "average", "## Finetuning", "| similar (cosine) (spearman) |"):
        assert name in report
    assert set(json.loads((out / "results.json").read_text())["finetune"]["rows"]["sentiment"]) == {
        "textjepa", "mlm", "random-init"}
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"textjepa", "mlm", "random-init"}
    assert all(results["budgets"][name]["steps_done"] >= 1 for name in ("textjepa", "mlm"))
    assert (out / "compare.png").stat().st_size > 0


def test_ablations_smoke(tmp_path):
    import ablations

    from textjepa.tokenization import train_tokenizer

    words = "the whale sea ship captain harpoon crew deck wind storm night day sail boat".split()
    lines = [" ".join(words[(i * 5 + j) % len(words)] for j in range(12 + i % 5)) for i in range(300)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(lines) + "\n")
    tokenizer_dir = tmp_path / "tok"
    train_tokenizer(str(corpus), vocab_size=120, output_dir=str(tokenizer_dir))
    out = tmp_path / "ablations"
    ablations.main([
        "--pretrain-data", str(corpus), "--eval-data", str(make_eval_data_dir(tmp_path / "eval")),
        "--tokenizer", str(tokenizer_dir), "--out", str(out), "--size", "tiny", "--steps", "3",
        "--batch-size", "4", "--recipe", str(RECIPES / "quickstart.yaml"),
        "--only", "tokens: base", "--only", "+ sentence 1.0", "--only", "halves: + cross-view 3",
        "--max-eval-examples", "20",
        "--set", "data.block_size=32", "--set", "log.probe_size=8", "--set", "mask.num_masks=1",
        "--set", "mask.num_views=1",
        "--finetune", "--finetune-args", "--tasks sentiment --learning-rates 1e-3 --epochs 1 --bootstrap-resamples 50",
    ])
    report = (out / "ablations.md").read_text()
    assert "| tokens: base |" in report and "| + sentence 1.0 |" in report
    assert f"| {ablations.FLOOR} |" in report and "average whitened" in report
    results = json.loads((out / "ablations.json").read_text())
    assert results["halves: + cross-view 3"]["final"]["cross_view_loss"] > 0
    assert results[ablations.FLOOR]["whitened"] and results[ablations.FLOOR]["scores"]
    assert results["+ sentence 1.0"]["final"]["sentence_loss"] > 0
    assert "sentence_loss" not in results["tokens: base"]["final"]
    assert "## Finetuning" in report and "| variant | sentiment |" in report
    assert 0.0 <= results["tokens: base"]["finetune"]["sentiment"]["test"] <= 100.0


def tiny_encoder_dir(corpus_words, directory, seed):
    """A tokenizer trained on the fixture words and a tiny randomly initialised textjepa encoder."""
    import torch
    from conftest import tiny_config_kwargs

    import textjepa
    from textjepa.tokenization import train_tokenizer

    corpus = directory.parent / "words.txt"
    corpus.write_text("\n\n".join(" ".join(corpus_words[i:] + corpus_words[:i]) for i in range(len(corpus_words))))
    tokenizer = train_tokenizer(str(corpus), vocab_size=120, output_dir=str(directory))
    torch.manual_seed(seed)
    config = textjepa.TextJepaConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    textjepa.TextJepaModel(config).save_pretrained(directory)
    return directory


def test_finetune_benchmark_smoke(tmp_path, capsys):
    import finetune
    from conftest import FILLER, NEGATIVE, POSITIVE, TOPICS

    words = POSITIVE + NEGATIVE + FILLER + [w for ws in TOPICS.values() for w in ws]
    models = [f"{name}={tiny_encoder_dir(words, tmp_path / name, seed)}" for seed, name in enumerate(("one", "two"))]
    out = tmp_path / "finetune"
    argv = ["--eval-data", str(make_eval_data_dir(tmp_path / "eval")), "--tasks", "sentiment", "similar",
            "--learning-rates", "1e-3", "1e-2", "--epochs", "1", "--max-train-examples", "32",
            "--max-validation-examples", "16", "--bootstrap-resamples", "100", "--out", str(out),
            "--model", models[0], "--model", models[1]]
    finetune.main(argv)
    results = json.loads((out / "finetune.json").read_text())
    assert list(results["rows"]) == ["sentiment", "similar", "similar (cosine)"]
    for row, per_model in results["rows"].items():
        for model, cell in per_model.items():
            per_lr = cell["per_lr_validation"]
            assert set(per_lr) == {"0.001", "0.01"}  # JSON keys
            assert cell["validation"] == max(per_lr.values())  # the lr is chosen on validation
            low, high = cell["test_interval"]
            assert low <= cell["test"] <= high and low < high
    run = json.loads((out / "runs" / "one" / "similar--cosine-" / "lr0.01-seed0" / "results.json").read_text())
    assert run["pair_head"] == "cosine" and run["num_examples"] == {"train": 32, "validation": 16, "test": 20}
    report = (out / "finetune.md").read_text()
    assert "| sentiment (accuracy) |" in report and "| similar (cosine) (spearman) |" in report
    capsys.readouterr()
    finetune.main(argv)  # a second call reuses every finished run
    assert "textjepa.evaluation.glue" not in capsys.readouterr().out


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the GPU check's steps, tiny and on the CPU (environment,
    throughput table, a 2-step pretraining of recipes/small.yaml, its export packed in parts)."""
    import os
    import subprocess
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "pretrain"
    corpus.mkdir()
    words = "the whale sea ship captain harpoon crew deck wind storm night day sail boat".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 9)) for i in range(300)]
    pq.write_table(pa.table({"text": docs}), corpus / "tiny.parquet")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), str(corpus), "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "gpu_check.log").read_text()
    assert "FAILED" not in log and "| h256L4 | 512 | bf16 |" in log and "pretraining: 2 steps" in log
    assert json.loads((out / "throughput.json").read_text())["rows"][0]["flop_ratio"] > 0
    parts = sorted(out.glob("small4min.tar.gz.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert "small4min/export/model.safetensors" in names and "small4min/summary.json" in names


def test_cooccurrence_encoder_puts_words_of_one_context_together(tmp_path):
    """Two tokens used in the same contexts get close vectors, a token of other contexts does not; the
    output is the input encoder with only its token table replaced, at the same scale."""
    import numpy as np
    import torch
    from datasets import Dataset
    import cooccurrence_encoder
    from conftest import FILLER, POSITIVE
    from transformers import AutoModel

    encoder = tiny_encoder_dir(POSITIVE + FILLER, tmp_path / "encoder", seed=0)
    rng = np.random.default_rng(0)
    blocks = []
    for i in range(400):  # topic blocks: tokens 5-15 with 31 or 32 among them; tokens 16-30 with 33
        block = rng.integers(5, 16, 32) if i % 2 == 0 else rng.integers(16, 31, 32)
        block[rng.integers(0, 32, 3)] = (31 if i % 4 == 0 else 32) if i % 2 == 0 else 33
        blocks.append(block.tolist())
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(tmp_path / "packed"))
    cooccurrence_encoder.main(["--encoder", str(encoder), "--packed", str(tmp_path / "packed"),
                               "--output", str(tmp_path / "cooc"), "--window", "3"])

    before, after = AutoModel.from_pretrained(encoder), AutoModel.from_pretrained(tmp_path / "cooc")
    table = after.get_input_embeddings().weight.detach()
    unit = torch.nn.functional.normalize(table, dim=1)
    same_context, other_context = float(unit[31] @ unit[32]), float(unit[31] @ unit[33])
    assert same_context > 0.2 and abs(other_context) < 0.05  # (0.34 and 0.00 here)
    assert float(unit[5] @ unit[6]) > 0.5 and abs(float(unit[5] @ unit[20])) < 0.05  # topic words: 0.79, 0.00
    assert torch.isclose(table.std(), before.get_input_embeddings().weight.std(), rtol=1e-3)
    rest = {k: v for k, v in after.state_dict().items() if "word_embeddings" not in k}
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in rest.items())


def test_heading_retrieval_builds_a_beir_folder_from_rst(tmp_path):
    import pandas as pd
    from make_heading_retrieval import main as make_heading_retrieval

    from textjepa.evaluation.retrieval import load_beir

    body = ("This section explains the {} in enough words to pass the minimum body length of the filter, "
            "with a few more words after that for good measure.")
    rows = []
    for title in ("Opening files safely", "Closing files safely", "Notes", "Opening files safely again"):
        rows += [title + "\n" + "=" * len(title), body.format(title.lower()), ".. index:: single: x"]
    rows += ["Notes\n-----", body.format("second notes")]  # "Notes": one word and repeated, never a query
    pd.DataFrame({"text": rows, "source": "doc"}).to_parquet(tmp_path / "doc.parquet")
    make_heading_retrieval(["--source", str(tmp_path / "doc.parquet"), "--out", str(tmp_path / "beir")])
    corpus, queries, qrels = load_beir(str(tmp_path / "beir"))
    assert sorted(queries.values()) == ["Closing files safely", "Opening files safely", "Opening files safely again"]
    assert len(corpus) == 5  # every kept section is searched, the "Notes" ones too
    for query_id, relevant in qrels.items():
        (doc_id,) = relevant
        assert queries[query_id].lower() in corpus[doc_id] and ".. index::" not in corpus[doc_id]


def test_weight_average_interpolates_and_soups_exports(tmp_path, capsys):
    """start + alpha * (mean(runs) - start) on real BertModel exports: alpha 0 is the start, one run at alpha 1 is
    the run, two runs make their mean; the folder loads in transformers; a different architecture is one line."""
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel
    from weight_average import main as weight_average

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    folders = []
    for seed in range(3):  # the start and two "runs"
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(tmp_path / f"m{seed}")
        folders.append(str(tmp_path / f"m{seed}"))
    start, run_a, run_b = (load_file(f"{folder}/model.safetensors") for folder in folders)

    def averaged(*args):
        assert weight_average(["--start", folders[0], "--out", str(tmp_path / "out"), *args]) == 0
        return load_file(str(tmp_path / "out" / "model.safetensors"))

    for name, value in averaged("--run", folders[1], "--alpha", "0").items():
        assert torch.equal(value, start[name])
    for name, value in averaged("--run", folders[1], "--alpha", "1").items():
        torch.testing.assert_close(value, run_a[name], rtol=0, atol=1e-6)
    for name, value in averaged("--run", folders[1], "--run", folders[2]).items():
        torch.testing.assert_close(value, (run_a[name] + run_b[name]) / 2, rtol=0, atol=1e-6)
    halfway = averaged("--run", folders[1], "--alpha", "0.5")
    for name, value in halfway.items():
        torch.testing.assert_close(value, (start[name] + run_a[name]) / 2, rtol=0, atol=1e-6)
    loaded = BertModel.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.embeddings.word_embeddings.weight, halfway["embeddings.word_embeddings.weight"])

    BertModel(BertConfig(**{**config.to_dict(), "num_hidden_layers": 2})).save_pretrained(tmp_path / "deeper")
    capsys.readouterr()  # transformers' own progress lines
    assert weight_average(["--start", folders[0], "--run", folders[1], "--run", str(tmp_path / "deeper"),
                           "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {tmp_path / 'deeper' / 'model.safetensors'}: tensor names differ") and \
        "\n" not in error
