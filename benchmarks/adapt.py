"""Domain adaptation of a pretrained encoder at equal wall-clock: textjepa against its unsupervised peers.

    python benchmarks/adapt.py --start DIR --target RETRIEVAL_DIR --minutes M --out OUT
        [--methods textjepa simcse tsdae mlm] [--lrs 3e-5 [1e-5 ...]] [--snapshots 2] [--eval-data ../shared/data/eval]

From one start (a sentence-transformers folder or a BERT/RoBERTa directory) and one target set (BEIR layout),
every method trains on the target's corpus.jsonl documents only (never its queries or judgements) for the same
training minutes (setup, saving and evaluation not counted), at each learning rate of --lrs:
  textjepa  recipes/adapt.yaml through `textjepa train` (one session per snapshot, then --resume: bit-exact)
  simcse    unsupervised SimCSE, sentence-transformers' MultipleNegativesRankingLoss on (text, text)
  tsdae     sentence-transformers' DenoisingAutoEncoderLoss, 60% word deletion, tied decoder
  mlm       continued MLM, transformers' *ForMaskedLM + DataCollatorForLanguageModeling (15%), mean pooling
  (the three peers: benchmarks/adapt_peers.py)
plus the start untouched and a random-init encoder of the start's architecture (the floor).
Each run is saved at --snapshots evenly spaced points; every snapshot is scored on the target's nDCG@10 over the
whole corpus (validation half and test half of the queries, retrieval.validation_test_qrels) and zero-shot STS-B.
Each method's (learning rate, snapshot) is chosen on validation nDCG@10; the chosen one alone gets "BM25 +
model" (weight chosen on validation) and the probes of --eval-data. The test half is reported, never used
to choose. Writes OUT/results.md, OUT/results.json and OUT/ndcg_vs_minutes.png.
Tokens are text tokens consumed (each training text's tokens once, truncated as the method reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_peers import PEER_METHODS, PeerTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("start", "random", "textjepa") + PEER_METHODS


def corpus_file(target: Path) -> Path:
    for name in ("corpus.jsonl", "corpus.jsonl.gz"):
        if (target / name).is_file():
            return target / name
    raise FileNotFoundError(f"{target}: no corpus.jsonl; expected a BEIR-layout folder")


# -------------------------------------------------------------------------------------------- training

def train_textjepa(args, lr, run_dir: Path, snapshot_dirs) -> list[dict]:
    """recipes/adapt.yaml in --snapshots sessions of minutes/snapshots each; the export after each is a snapshot."""
    points = []
    for i, snapshot in enumerate(snapshot_dirs):
        command = [sys.executable, "-m", "textjepa.cli", "train", "--recipe", str(args.recipe),
                   "--set", f"model.init_from={args.start}", "--set", f"data.source={corpus_file(args.target)}",
                   "--set", f"train.output_dir={run_dir}", "--set", f"train.max_minutes={args.minutes / args.snapshots}",
                   "--set", f"optim.lr={lr}", "--set", f"optim.min_lr={lr}", "--set", f"train.seed={args.seed}",
                   "--set", "log.sanity_check=false", "--set", "log.plot=false", "--set", "log.progress_bar=false"]
        for item in args.set:
            command += ["--set", item]
        if args.threads:
            command += ["--set", f"train.threads={args.threads}"]
        if i:
            command.append("--resume")
        subprocess.run(command, check=True, cwd=REPO)
        summary = json.loads((run_dir / "summary.json").read_text())
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(run_dir / "export", snapshot)
        points.append({"minutes": args.minutes * (i + 1) / args.snapshots, "steps": summary["steps"],
                       "tokens": summary["tokens_seen"], "train_seconds": summary["elapsed_s"], "path": str(snapshot)})
    return points


class TextStream:
    """The corpus texts in a seeded shuffled order, epoch after epoch, in batches, with their token counts."""

    def __init__(self, texts, lengths, batch_size, seed):
        self.texts, self.lengths, self.batch_size = texts, lengths, batch_size
        self.rng, self.order, self.position = random.Random(seed), [], 0

    def next(self):
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = list(range(len(self.texts))), 0
            self.rng.shuffle(self.order)
        picked = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [self.texts[i] for i in picked], int(sum(self.lengths[i] for i in picked))


def train_peer(method, args, lr, texts, lengths, snapshot_dirs) -> list[dict]:
    """One peer for minutes of optimizer steps (the clock runs during steps only), saved at each snapshot."""
    torch.manual_seed(args.seed)
    trainer = PeerTrainer(method, str(args.start), lr=lr, batch_size=args.batch_size, max_length=args.max_length,
                          seed=args.seed)
    stream = TextStream(texts, lengths, args.batch_size, args.seed)
    points, trained, steps, tokens = [], 0.0, 0, 0
    for i, snapshot in enumerate(snapshot_dirs):
        until = 60.0 * args.minutes * (i + 1) / args.snapshots
        while trained < until:
            batch, batch_tokens = stream.next()
            start = time.perf_counter()
            trainer.step(batch)
            trained += time.perf_counter() - start
            steps, tokens = steps + 1, tokens + batch_tokens
        trainer.save(snapshot)
        points.append({"minutes": args.minutes * (i + 1) / args.snapshots, "steps": steps, "tokens": tokens,
                       "train_seconds": trained, "path": str(snapshot)})
        print(f"[{method} lr {lr:g}] {steps} steps, {tokens:,} tokens in {trained / 60:.1f} min", flush=True)
    return points


def random_init_copy(start: Path, out: Path) -> Path:
    """The start's architecture, tokenizer and pooling with freshly initialised weights (the floor)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(start), device="cpu")
    transformer = model[0].auto_model
    torch.manual_seed(0)
    # a new model from the config: re-running _init_weights on loaded tensors is a no-op in transformers 5
    fresh = type(transformer)(transformer.config)
    transformer.load_state_dict(fresh.state_dict())
    model.save(str(out))
    return out


# -------------------------------------------------------------------------------------------- evaluation

def score_snapshot(path, target_set, sts_spec) -> dict:
    """nDCG@10 on the target (validation and test halves, whole corpus) and zero-shot STS-B (both splits)."""
    from textjepa.evaluation import SentenceEncoder
    from textjepa.evaluation.retrieval import evaluate_retrieval
    from textjepa.evaluation.sts import evaluate_sts_task

    encoder = SentenceEncoder(path, batch_size=128)
    name, corpus, queries, by_split = target_set
    result = {"retrieval": evaluate_retrieval(encoder, corpus, queries, by_split, name=name)}
    if sts_spec is not None:
        result["sts"] = {split: evaluate_sts_task(encoder, sts_spec, split=split) for split in by_split}
    return result


def final_scores(path, target_set, probe_specs) -> dict:
    """For a method's chosen snapshot: BM25 + model (weight on validation) and the probes."""
    from textjepa.evaluation import SentenceEncoder
    from textjepa.evaluation import baselines as lexical
    from textjepa.evaluation.probe import linear_probe

    encoder = SentenceEncoder(path, batch_size=128, cache=True)
    name, corpus, queries, by_split = target_set
    return {"hybrid": lexical.hybrid_retrieval(encoder, corpus, queries, by_split, name=name),
            "probes": [linear_probe(encoder, spec) for spec in probe_specs]}


def figure(result, split, key="ndcg_at_10"):
    return result[split][key]


def half_width(result, split):
    from textjepa.evaluation.metrics import interval

    replicates = result.get("replicates", {}).get(split)
    if replicates is None:
        return None
    low, high = interval(replicates)
    return (high - low) / 2


def cell(result, split, key=None):
    if split not in result:  # --sweep reads validation only
        return "-"
    key = key or result["metric"]
    value, width = result[split][key], half_width(result, split)
    return f"{value:.1f}" + (f" ± {width:.1f}" if width is not None else "")


# -------------------------------------------------------------------------------------------- report

def write_report(out: Path, report: dict) -> None:
    rows = report["chosen"]
    lines = [f"# Domain adaptation at equal training time: {report['minutes']} min per run",
             "",
             f"Start `{report['start']}`, target `{report['target']}` ({report['num_documents']:,} documents, the whole "
             f"corpus searched; " + " / ".join(f"{n} {split}" for split, n in report['num_queries'].items()) + " "
             f"queries). Each method's learning rate and stopping point chosen on validation nDCG@10; learning rates "
             f"tried: {', '.join(f'{lr:g}' for lr in report['lrs'])}. Machine: {report['machine']}.",
             "",
             "| method | lr | chosen at (min) | steps | tokens | nDCG@10 val | nDCG@10 test | BM25 + model test (w) "
             f"| STS-B zero-shot {report['sts_split']} | " + " | ".join(f"{p} probe test" for p in report["probe_names"]) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(report["probe_names"])]
    for method, row in rows.items():
        retrieval, hybrid = row["scores"]["retrieval"], row.get("final", {}).get("hybrid")
        sts = row["scores"].get("sts", {}).get("test") or row["scores"].get("sts", {}).get("validation")
        probes = row.get("final", {}).get("probes", [])
        lines.append("| " + " | ".join([
            method, f"{row['lr']:g}" if row["lr"] else "-", f"{row['minutes']:g}", f"{row['steps']:,}",
            f"{row['tokens']:,}", cell(retrieval, "validation"), cell(retrieval, "test"),
            f"{cell(hybrid, 'test')} ({hybrid['weight']:g})" if hybrid else "-",
            cell(sts, "test") if sts else "-"] + [cell(p, "test") for p in probes]) + " |")
    for name, result in report["baselines"].items():
        lines.append(f"| {name} | - | - | - | - | {cell(result, 'validation')} | {cell(result, 'test')} | - | - |"
                     + " - |" * len(report["probe_names"]))
    lines += ["", "Every run, every snapshot:", "",
              f"| method | lr | minutes | steps | tokens | nDCG@10 val | nDCG@10 test | STS-B {report['sts_split']} |",
              "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for point in run["points"]:
            retrieval, sts = point["scores"]["retrieval"], point["scores"].get("sts", {}).get("test")
            sts = sts or point["scores"].get("sts", {}).get("validation")
            lines.append(f"| {run['method']} | {run['lr']:g} | {point['minutes']:g} | {point['steps']:,} | "
                         f"{point['tokens']:,} | {cell(retrieval, 'validation')} | {cell(retrieval, 'test')} | "
                         f"{cell(sts, 'test') if sts else '-'} |")
    lines += ["", "Cells: the figure ± half its 95% bootstrap interval over queries / pairs / sentences.",
              f"Command: `{report['command']}`", ""]
    (out / "results.md").write_text("\n".join(lines))


def plot(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    start = report["chosen"].get("start")
    start_value = figure(start["scores"]["retrieval"], "validation") if start else None
    for run in report["runs"]:
        minutes = [0.0] + [p["minutes"] for p in run["points"]] if start else [p["minutes"] for p in run["points"]]
        values = ([start_value] if start else []) + [figure(p["scores"]["retrieval"], "validation") for p in run["points"]]
        ax.plot(minutes, values, marker="o", label=f"{run['method']} (lr {run['lr']:g})")
    if "BM25" in report["baselines"]:
        ax.axhline(figure(report["baselines"]["BM25"], "validation"), color="gray", linestyle="--", label="BM25")
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("nDCG@10, validation queries")
    ax.set_title(f"{Path(report['target']).name}: adapting {'/'.join(Path(report['start']).parts[-2:])}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ndcg_vs_minutes.png", dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=Path, required=True, help="sentence-transformers folder or BERT/RoBERTa dir")
    parser.add_argument("--target", type=Path, required=True, help="BEIR-layout folder (corpus.jsonl trains)")
    parser.add_argument("--minutes", type=float, required=True, help="training minutes per run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-5], help="learning rates, each method alike")
    parser.add_argument("--snapshots", type=int, default=2, help="evenly spaced evaluation points per run")
    parser.add_argument("--batch-size", type=int, default=32, help="peers' texts per step (the recipe's for textjepa)")
    parser.add_argument("--max-length", type=int, default=128, help="peers' tokens per text")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "adapt.yaml")
    parser.add_argument("--set", action="append", default=[], help="extra textjepa recipe overrides KEY=VALUE")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="GLUE-style task folders (task.json): STS-B zero-shot from its stsb/ at every snapshot, "
                             "the probes of the others for the chosen snapshots")
    parser.add_argument("--probe-max-examples", type=int, default=None, help="cap each probe split (speed)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sweep", action="store_true",
                        help="validation choices only: no BM25 + model, probes or lexical baselines (faster)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default="2-core CPU", help="said in results.md")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from textjepa.evaluation import baselines as lexical
    from textjepa.evaluation.retrieval import load_beir, validation_test_qrels
    from textjepa.evaluation.tasks import load_task_dir

    args.out.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = load_beir(str(args.target))
    by_split = validation_test_qrels(str(args.target), qrels)
    if args.sweep:  # choices are made on validation; the test half is not even scored
        by_split = {"validation": by_split["validation"]}
    target_set = (args.target.name, corpus, queries, by_split)
    sts_spec, probe_specs = None, []
    if args.eval_data:
        for task_dir in sorted(p for p in args.eval_data.iterdir() if (p / "task.json").is_file()):
            spec = load_task_dir(str(task_dir), max_examples=args.probe_max_examples if task_dir.name != "stsb" else None)
            if spec.is_regression and spec.is_pair:
                sts_spec = spec
            else:
                probe_specs.append(spec)
    from transformers import AutoTokenizer

    from textjepa.embedding.model_dir import check_model_dir

    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(str(args.start)))
    texts = list(corpus.values())  # the documents only
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]

    runs, chosen = [], {}
    for method in args.methods:
        if method in ("start", "random"):
            path = args.start if method == "start" else random_init_copy(args.start, args.out / "random-init")
            point = {"minutes": 0.0, "steps": 0, "tokens": 0, "path": str(path),
                     "scores": score_snapshot(str(path), target_set, sts_spec)}
            chosen[method] = dict(point, lr=None)
            continue
        for lr in args.lrs:
            run_dir = args.out / "runs" / f"{method}-lr{lr:g}"
            snapshots = [run_dir / f"snapshot-{i + 1}" for i in range(args.snapshots)]
            if method == "textjepa":
                points = train_textjepa(args, lr, run_dir / "train", snapshots)
            else:
                points = train_peer(method, args, lr, texts, lengths, snapshots)
            for point in points:
                point["scores"] = score_snapshot(point["path"], target_set, sts_spec)
            runs.append({"method": method, "lr": lr, "points": points})
            best = max(points, key=lambda p: figure(p["scores"]["retrieval"], "validation"))
            if method not in chosen or (figure(best["scores"]["retrieval"], "validation")
                                        > figure(chosen[method]["scores"]["retrieval"], "validation")):
                chosen[method] = dict(best, lr=lr)
            (args.out / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
    baselines = {}
    if not args.sweep:
        for method, row in chosen.items():  # the chosen snapshots only
            row["final"] = final_scores(row["path"], target_set, probe_specs)
        name, corpus_, queries_, by_split = target_set
        baselines = {"BM25": lexical.bm25_retrieval(corpus_, queries_, by_split, name=name),
                     "TF-IDF": lexical.tfidf_retrieval(corpus_, queries_, by_split, name=name)}
    report = {"start": str(args.start), "target": str(args.target), "minutes": args.minutes, "lrs": args.lrs,
              "num_documents": len(corpus), "num_queries": {s: len(q) for s, q in target_set[3].items()},
              "sts_split": "validation" if args.sweep else "test",
              "probe_names": [] if args.sweep else [s.name for s in probe_specs], "machine": args.machine,
              "command": "python benchmarks/adapt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs, "chosen": chosen, "baselines": baselines}
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=lambda o: o.tolist()
                                                      if isinstance(o, np.ndarray) else str(o)))
    write_report(args.out, report)
    plot(args.out, report)
    print((args.out / "results.md").read_text())
    return report


if __name__ == "__main__":
    main()
