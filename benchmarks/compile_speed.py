"""`train.compile` on the CPU: first-step cost and steady step time, eager vs torch.compile, through the
real trainer (`textjepa.training.loop.train`, the recipe's model, masks, batch and AdamW).

    python benchmarks/compile_speed.py                                  # mini + small, fp32 + bf16, 3 rounds
    python benchmarks/compile_speed.py --settings mini --precisions fp32 --rounds 1 --steps 6   # a quick look

Settings: mini = recipes/quickstart.yaml (h128 L4, batch 32 x 128); small = recipes/small.yaml (h256 L4,
batch 64 x 128) reading the quickstart corpus and tokenizer instead of ../shared/data. Every run is a
fresh process; each setting and precision gets its own inductor cache (TORCHINDUCTOR_CACHE_DIR, a new
temp folder), so its first compiled run (round 1) is a cold compile, as in a first run on a machine,
and the later rounds' compiled runs read that cache, as later runs on the same machine do ("warm").
Runs are interleaved round by round (eager, compiled, eager, compiled, ...) and the table gives medians
over rounds. Step times come from metrics.jsonl (log.every 1: tokens per step / tokens_per_s); the
first step includes the compile; "steady" is the median of steps 3 .. N-1 (the last step also runs
the effective-rank probe). Break-even = extra first-step seconds / seconds saved per later step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "mini": ("recipes/quickstart.yaml", []),
    "small": ("recipes/small.yaml", ["data.source=quickstart", "data.tokenizer=quickstart"]),
}


def overrides(setting: str, precision: str, compiled: bool, steps: int, threads: int, output_dir: str) -> list[str]:
    mixed_precision = "'no'" if precision == "fp32" else precision  # quoted: YAML reads a bare no as false
    return SETTINGS[setting][1] + [
        f"train.output_dir={output_dir}", f"train.max_steps={steps}", f"train.threads={threads}",
        f"train.mixed_precision={mixed_precision}", f"train.compile={str(compiled).lower()}",
        "train.export=false", "train.max_minutes=null", "train.save_every=100000", "train.export_whiten_on=null",
        "log.every=1", "log.diag_every=100000", "log.trackers=[jsonl]", "log.plot=false", "log.progress_bar=false",
    ]


def pack_corpus(directory: str) -> str:
    """The quickstart corpus tokenized and packed once (data.packed_path for every run: no per-run setup)."""
    import datasets

    from textjepa.training.batches import load_blocks, resolve_tokenizer
    from textjepa.training.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes/quickstart.yaml")
    tokenizer = resolve_tokenizer(recipe, Path(directory), True)
    train, valid = load_blocks(recipe, tokenizer, Path(directory))
    path = str(Path(directory) / "packed")
    datasets.DatasetDict(train=train.with_format(None), validation=valid.with_format(None)).save_to_disk(path)
    return path


def worker(spec: dict) -> dict:
    """One run in this process: the step times of metrics.jsonl and the run's compile figures."""
    from textjepa.training import loop
    from textjepa.training.diagnostics import read_jsonl
    from textjepa.training.recipe import load_recipe

    recipe = load_recipe(REPO / SETTINGS[spec["setting"]][0], spec["overrides"])
    start = time.perf_counter()
    summary = loop.train(recipe, announce=lambda *a, **k: None)
    wall = time.perf_counter() - start
    records = read_jsonl(Path(recipe.train.output_dir) / loop.METRICS_FILE)
    tokens = recipe.train.batch_size * recipe.data.block_size
    return {"step_s": [tokens / r["tokens_per_s"] for r in records], "compile": summary.get("compile"),
            "wall_s": wall, "loss": [r["loss"] for r in records]}


def run_one(setting, precision, variant, steps, threads, cache_dir, packed) -> dict:
    with tempfile.TemporaryDirectory(prefix="compile_speed_run_") as out:
        spec = {"setting": setting, "overrides": overrides(setting, precision, variant != "eager", steps, threads, out)
                + [f"data.packed_path={packed}", "data.tokenizer=quickstart"]}
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{setting} {precision} {variant}: worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _steady(run: dict) -> float:
    return statistics.median(run["step_s"][2:-1])


def table(results: dict) -> str:
    """results[(setting, precision, variant)] = runs in round order (variant eager / compile; the first
    compiled run of a setting is the cold compile, the later ones read its inductor cache) -> markdown."""
    lines = ["| setting | precision | eager first step s | compiled first step s: cold / warm | eager steady s | "
             "compiled steady s | steady speed-up | graphs | last compile at step | break-even steps: cold / warm |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(s, p) for s, p, _ in results}, key=lambda k: (list(SETTINGS).index(k[0]), k[1]))
    for setting, precision in keys:
        eager, compiled = results[(setting, precision, "eager")], results[(setting, precision, "compile")]
        eager_first = statistics.median(r["step_s"][0] for r in eager)
        eager_steady = statistics.median(_steady(r) for r in eager)
        cold = compiled[0]["step_s"][0]
        warm = statistics.median(r["step_s"][0] for r in compiled[1:]) if len(compiled) > 1 else None
        steady = statistics.median(_steady(r) for r in compiled)
        saved = eager_steady - steady

        def even(first):
            if first is None:
                return "-"
            return f"{(first - eager_first) / saved:.0f}" if saved > 0 else "never"

        graphs = "/".join(str(r["compile"]["graphs"]) for r in compiled)
        last = "/".join(str(r["compile"]["last_compile_step"]) for r in compiled)
        warm_text = f"{warm:.1f}" if warm is not None else "-"
        lines.append(f"| {setting} | {precision} | {eager_first:.2f} | {cold:.1f} / {warm_text} | {eager_steady:.3f} | "
                     f"{steady:.3f} | {eager_steady / steady:.2f}x | {graphs} | {last} | {even(cold)} / {even(warm)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="mini,small")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (>= 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.steps < 4:
        parser.error("--steps must be >= 4 (steady = steps 3 .. N-1)")
    pairs = [(s, p) for s in args.settings.split(",") for p in args.precisions.split(",")]
    packed_dir = tempfile.mkdtemp(prefix="compile_speed_data_")
    packed = pack_corpus(packed_dir)
    caches = {pair: tempfile.mkdtemp(prefix="compile_speed_inductor_") for pair in pairs}  # empty: cold first
    results, started = {}, time.perf_counter()
    print(f"load average at start: {load_average()}", file=sys.stderr)
    try:
        for round_index in range(args.rounds):
            for setting, precision in pairs:
                for variant in ("eager", "compile"):
                    run = run_one(setting, precision, variant, args.steps, args.threads, caches[(setting, precision)],
                                  packed)
                    run["load"] = load_average()
                    results.setdefault((setting, precision, variant), []).append(run)
                    print(f"round {round_index + 1} {setting} {precision} {variant}: first {run['step_s'][0]:.2f}s, "
                          f"steady {_steady(run):.3f}s, compile {run['compile']}, load {run['load']}",
                          file=sys.stderr, flush=True)
    finally:
        for path in [*caches.values(), packed_dir]:
            shutil.rmtree(path, ignore_errors=True)
    print(f"load average at end: {load_average()}; {time.perf_counter() - started:.0f}s", file=sys.stderr)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}|{p}|{v}": runs for (s, p, v), runs in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
