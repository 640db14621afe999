"""benchmarks/adapt.py end to end on a tiny random BERT (sentence-transformers layout) and a tiny BEIR set: every
method trains for seconds, every snapshot is scored, the chosen ones get BM25 + model and the probes, and the
table, the JSON and the plot are written. (The real measurements: docs/adapt.md; never timed in tests.)"""

import json
import random
import sys
from pathlib import Path

from conftest import make_eval_data_dir, write_jsonl
from test_conversion import random_source
from test_train import generated_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def tiny_beir(root):
    """Documents of the generated corpus; each query is a few words of one document, which is its answer."""
    rng = random.Random(0)
    docs = [d.lower() for d in generated_corpus(60).strip().split("\n\n")]
    (root / "qrels").mkdir(parents=True)
    write_jsonl(root / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": d} for i, d in enumerate(docs)])
    picked = rng.sample(range(len(docs)), 20)
    write_jsonl(root / "queries.jsonl", [{"_id": f"q{i}", "text": " ".join(docs[i].split()[2:8])} for i in picked])
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in picked))
    return root


def test_adapt_benchmark_smoke(tmp_path):
    import adapt

    random_source(tmp_path / "start", "bert", sentence_transformers=True)
    target = tiny_beir(tmp_path / "target")
    eval_data = make_eval_data_dir(tmp_path / "data") / "eval"
    report = adapt.main(["--start", str(tmp_path / "start"), "--target", str(target), "--minutes", "0.02",
                         "--out", str(tmp_path / "out"), "--snapshots", "2", "--eval-data", str(eval_data),
                         "--batch-size", "4", "--max-length", "32", "--threads", "1",
                         "--set", "data.block_size=32", "--set", "train.batch_size=4", "--set", "log.min_rank=0",
                         # a tiny random start's pooled vectors barely vary: not a collapse to guard against
                         "--set", "log.min_std=0", "--set", "data.validation_fraction=0.1"])
    assert set(report["chosen"]) == set(adapt.METHODS)
    trained = [run for run in report["runs"]]
    assert {run["method"] for run in trained} == {"textjepa", "simcse", "tsdae", "mlm"}
    for run in trained:
        assert [p["minutes"] for p in run["points"]] == [0.01, 0.02] and run["points"][-1]["steps"] >= 1
        assert run["points"][-1]["tokens"] > 0
    # the floor is a fresh initialisation, not the start again
    assert report["chosen"]["random"]["scores"]["sts"]["test"]["test"]["spearman"] != \
        report["chosen"]["start"]["scores"]["sts"]["test"]["test"]["spearman"]
    textjepa = report["chosen"]["textjepa"]
    assert json.loads((Path(textjepa["path"]) / "config.json").read_text())["model_type"] == "bert"
    assert textjepa["final"]["hybrid"]["weight"] is not None and textjepa["final"]["probes"]
    table = (tmp_path / "out" / "results.md").read_text()
    for row in ("| textjepa |", "| simcse |", "| tsdae |", "| mlm |", "| start |", "| random |", "| BM25 |"):
        assert row in table
    assert (tmp_path / "out" / "ndcg_vs_minutes.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["minutes"] == 0.02


def test_adapt_benchmark_sweep_reads_validation_only(tmp_path):
    import adapt

    random_source(tmp_path / "start", "bert", sentence_transformers=True)
    target = tiny_beir(tmp_path / "target")
    report = adapt.main(["--start", str(tmp_path / "start"), "--target", str(target), "--minutes", "0.01",
                         "--out", str(tmp_path / "out"), "--snapshots", "1", "--methods", "simcse", "--sweep",
                         "--batch-size", "4", "--max-length", "32", "--threads", "1"])
    point = report["runs"][0]["points"][0]
    assert list(point["scores"]["retrieval"]["num_queries"]) == ["validation"]  # the test half is not scored
    assert "| simcse |" in (tmp_path / "out" / "results.md").read_text() and not report["baselines"]
