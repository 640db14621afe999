"""Throughput of one textjepa pretraining step vs HF RobertaForMaskedLM, side by side in ONE process.

    python benchmarks/throughput.py --quick                        # ~1-2 min: h256 L4, vocab 8192 (issue 2)
    python benchmarks/throughput.py --json throughput.json         # full table (issue 6), tens of minutes

What one step is (both models, same batch B x L, same fused AdamW, same precision/attention):
  textjepa: teacher forward (full sequence, no grad) + student forward on the visible tokens +
            predictor + smooth-L1 loss + backward + AdamW step + EMA teacher update (foreach lerp).
            Mask: SpanMaskCollator defaults (I-JEPA-like: 30% targets in 4 spans, K=1).
  mlm:      RobertaForMaskedLM forward (logits for all B*L tokens, as HF computes them) + cross
            entropy on 15% masked positions + backward + AdamW step.
            "mlm" = equal settings (dropout 0, same attention kernel); "mlm-hf" = HF's defaults
            (dropout 0.1, the attention kernel transformers picks), same precision and optimizer.
tokens/s = B * L / step seconds for every variant (the whole sequence, for both models).

The machine is shared and noisy, so variants are interleaved: each round runs every variant (and the
matmul peaks) once, for --steps timed steps, in turn (A, B, C, A, B, C, ...); the table reports the
median over rounds. Trust ratios within a run more than absolute numbers between runs.

Model FLOPs (analytic; embeddings lookups, norms, activations, softmax, loss, optimizer and EMA are
not counted; backward = 2 x forward, so a trained part costs 3 x its forward):
  linear forward on N tokens with a (d_in x d_out) weight: 2 * N * d_in * d_out
  encoder layer weights: P_layer = 4 H^2 + 2 H F          (fused QKV 3H^2, output H^2, MLP 2HF)
  attention scores + weighted sum, per layer, T tokens per row: 2 * 2 * rows * T^2 * H
  encoder forward(rows, T) = 2 * rows * T * n_layers * P_layer + 4 * rows * T^2 * H * n_layers
  textjepa = 1 x encoder(B, L)                                  teacher, forward only
           + 3 x encoder(B*K, Nc)                               student on visible tokens
           + 3 x [2 B K Nc H Hp                                 predictor input projection
                  + encoder_p(B*K, Nc + Nt)                     predictor layers (width Hp, FFN Fp)
                  + 2 B K Nt Hp H]                              output projection, targets only
  mlm      = 3 x [encoder(B, L) + 2 B L (H^2 + H V)]            RoBERTa LM head on every token
MFU = model FLOPs / step seconds / peak, where the peak is a large torch.mm measured in the same
rounds: fp32 steps against the fp32 peak, bf16-autocast steps against the bf16 peak.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from transformers import RobertaForMaskedLM

from textjepa import TextJepaConfig, TextJepaForPreTraining
from textjepa.masking import MaskingConfig, SpanMaskCollator
from textjepa.modeling_textjepa import per_dimension_std
from textjepa.training import build

CONFIGS = {
    # name: (hidden, layers, heads, ffn)
    "h256L4": (256, 4, 4, 1024),
    "h512L8": (512, 8, 8, 2048),
    "h768L12": (768, 12, 12, 3072),  # base size, for a GPU
}
MASK_TOKEN_ID = 4  # RoBERTa-like tokenizers: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4
PAD_TOKEN_ID = 1


# ----------------------------------------------------------------------------------------------
# Data: a few fixed random batches per vocabulary, built before any timing
# ----------------------------------------------------------------------------------------------


def make_jepa_batches(vocab, batch, length, count, seed=0):
    """count batches of (input_ids (B, L), context_idx (B, 1, Nc), target_idx (B, 1, Nt)), default masks."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        ids = torch.randint(5, vocab, (batch, length), generator=generator)
        out = SpanMaskCollator(MaskingConfig(), seed=seed + i)([{"input_ids": row} for row in ids])
        batches.append((out["input_ids"], out["context_idx"], out["target_idx"]))
    return batches


def make_mlm_batches(vocab, batch, length, count, ratio=0.15, seed=0):
    """count batches of (masked input_ids (B, L), labels (B, L) with -100 outside the 15%)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    num_masked = round(ratio * length)
    for _ in range(count):
        ids = torch.randint(5, vocab, (batch, length), generator=generator)
        positions = torch.rand(batch, length, generator=generator).argsort(dim=1)[:, :num_masked]
        is_masked = torch.zeros(batch, length, dtype=torch.bool).scatter_(1, positions, True)
        labels = torch.where(is_masked, ids, torch.full_like(ids, -100))
        batches.append((ids.masked_fill(is_masked, MASK_TOKEN_ID), labels))
    return batches


# ----------------------------------------------------------------------------------------------
# Models and one training step each
# ----------------------------------------------------------------------------------------------


def adamw(model):
    # fused AdamW (one kernel over all params) where torch supports it, else foreach
    return build.adamw(model.parameters(), lr=1e-4, weight_decay=0.01)


def build_jepa(size, vocab, attn, length):
    hidden, layers, heads, ffn = CONFIGS[size]
    config = TextJepaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=max(512, length), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=PAD_TOKEN_ID, attn_implementation=attn,
    )
    model = TextJepaForPreTraining(config).train()
    model.teacher  # create the EMA teacher now, not inside the first timed step
    return model, adamw(model)


def build_mlm(size, vocab, attn, length, hf_defaults=False):
    hidden, layers, heads, ffn = CONFIGS[size]
    kwargs = {}
    if not hf_defaults:  # equal settings: no dropout, the same attention kernel as textjepa
        kwargs.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn)
    config = build.roberta_config(vocab, hidden, layers, heads, ffn, max(512, length), PAD_TOKEN_ID, 0, 2, **kwargs)
    model = RobertaForMaskedLM(config).train()
    return model, adamw(model)


def autocast(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def jepa_step(model, optimizer, batch, precision):
    input_ids, context_idx, target_idx = batch
    with autocast(precision):
        loss = model(input_ids, context_idx, target_idx).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_teacher(0.996)


def mlm_step(model, optimizer, batch, precision):
    input_ids, labels = batch
    with autocast(precision):
        loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# FLOPs and peaks
# ----------------------------------------------------------------------------------------------


def encoder_forward_flops(rows, tokens, hidden, layers, ffn):
    per_layer_weights = 4 * hidden * hidden + 2 * hidden * ffn
    return 2 * rows * tokens * layers * per_layer_weights + 4 * rows * tokens * tokens * hidden * layers


def jepa_step_flops(config, batch, length, num_masks, num_context, num_target):
    h, hp = config.hidden_size, config.predictor_hidden_size
    rows = batch * num_masks
    teacher = encoder_forward_flops(batch, length, h, config.num_hidden_layers, config.intermediate_size)
    student = encoder_forward_flops(rows, num_context, h, config.num_hidden_layers, config.intermediate_size)
    predictor = (
        2 * rows * num_context * h * hp
        + encoder_forward_flops(rows, num_context + num_target, hp, config.predictor_num_hidden_layers,
                                config.predictor_intermediate_size)
        + 2 * rows * num_target * hp * h
    )
    return teacher + 3 * student + 3 * predictor


def mlm_step_flops(config, batch, length):
    h = config.hidden_size
    encoder = encoder_forward_flops(batch, length, h, config.num_hidden_layers, config.intermediate_size)
    head = 2 * batch * length * (h * h + h * config.vocab_size)
    return 3 * (encoder + head)


def matmul_seconds(dtype, size=2048, repeats=4):
    """Seconds per (size x size) @ (size x size) torch.mm; the best of `repeats` after a warmup."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


# ----------------------------------------------------------------------------------------------
# The interleaved benchmark
# ----------------------------------------------------------------------------------------------


def run_group(size, vocab, precisions, args, log):
    """All variants of one (size, vocab): models built once, rounds interleave every variant."""
    batch, length = args.batch, args.seq
    jepa, jepa_opt = build_jepa(size, vocab, args.attn, length)
    mlm, mlm_opt = build_mlm(size, vocab, args.attn, length)
    variants = [("textjepa", jepa, jepa_opt, jepa_step, make_jepa_batches(vocab, batch, length, 3))]
    mlm_batches = make_mlm_batches(vocab, batch, length, 3)
    variants.append(("mlm", mlm, mlm_opt, mlm_step, mlm_batches))
    if not args.no_hf_default:
        mlm_hf, mlm_hf_opt = build_mlm(size, vocab, args.attn, length, hf_defaults=True)
        variants.append(("mlm-hf", mlm_hf, mlm_hf_opt, mlm_step, mlm_batches))
    hf_attn = variants[-1][1].config._attn_implementation

    # warmup: first steps allocate optimizer state and fill allocator caches
    for name, model, optimizer, step, batches in variants:
        for precision in precisions:
            for i in range(args.warmup):
                step(model, optimizer, batches[i % len(batches)], precision)

    times = {(name, p): [] for name, *_ in variants for p in precisions}
    peak_times = {p: [] for p in precisions}
    counter = 0
    for round_index in range(args.rounds):
        for precision in precisions:
            peak_times[precision].append(matmul_seconds(torch.float32 if precision == "fp32" else torch.bfloat16))
            for name, model, optimizer, step, batches in variants:
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(model, optimizer, batches[counter % len(batches)], precision)
                    counter += 1
                times[(name, precision)].append((time.perf_counter() - start) / args.steps)
        log(f"  {size} v{vocab} round {round_index + 1}/{args.rounds}: "
            + ", ".join(f"{n}/{p} {statistics.median(t) * 1e3:.0f} ms" for (n, p), t in times.items()))

    _, context_idx, target_idx = variants[0][4][0]
    jepa_flops = jepa_step_flops(jepa.config, batch, length, *context_idx.shape[1:], target_idx.shape[2])
    mlm_flops = mlm_step_flops(mlm.config, batch, length)
    rows = []
    for precision in precisions:
        peak = 2 * 2048**3 / statistics.median(peak_times[precision])  # FLOP/s
        seconds = {name: statistics.median(times[(name, precision)]) for name, *_ in variants}
        row = {
            "config": size, "vocab": vocab, "precision": precision, "attn": args.attn, "hf_default_attn": hf_attn,
            "batch": batch, "seq": length, "rounds": args.rounds, "steps_per_round": args.steps,
            "num_context": int(context_idx.shape[2]), "num_target": int(target_idx.shape[2]),
            "peak_gflops": peak / 1e9,
            "textjepa_gflop_per_step": jepa_flops / 1e9, "mlm_gflop_per_step": mlm_flops / 1e9,
        }
        for name, secs in seconds.items():
            row[f"{name}_ms"] = secs * 1e3
            row[f"{name}_tokens_per_s"] = batch * length / secs
            row[f"{name}_all_ms"] = [t * 1e3 for t in times[(name, precision)]]
        row["textjepa_mfu"] = jepa_flops / seconds["textjepa"] / peak
        row["mlm_mfu"] = mlm_flops / seconds["mlm"] / peak
        row["ratio_vs_mlm"] = seconds["mlm"] / seconds["textjepa"]
        if "mlm-hf" in seconds:
            row["mlm-hf_mfu"] = mlm_flops / seconds["mlm-hf"] / peak
            row["ratio_vs_mlm_hf"] = seconds["mlm-hf"] / seconds["textjepa"]
        # per-round ratios show how stable the median ratio is; the best-of ratio (fastest round of
        # each) is the least disturbed by other processes on a shared machine
        row["ratio_vs_mlm_per_round"] = [m / j for m, j in zip(times[("mlm", precision)], times[("textjepa", precision)])]
        row["ratio_vs_mlm_best"] = min(times[("mlm", precision)]) / min(times[("textjepa", precision)])
        row["textjepa_mfu_best"] = jepa_flops / min(times[("textjepa", precision)]) / (2 * 2048**3 / min(peak_times[precision]))
        rows.append(row)
    return rows


def jepa_split_step(model, optimizer, batch, precision, clock):
    """One textjepa step cut into phases (the same calls TextJepaForPreTraining.forward makes, K=1),
    each closed by clock(phase) so the cost split can be read off."""
    input_ids, context_idx, target_idx = batch
    context_idx, target_idx = context_idx[:, 0], target_idx[:, 0]  # (B, Nc), (B, Nt)
    with autocast(precision):
        targets = model.compute_targets(input_ids, None, target_idx)  # (B, Nt, H)
        clock("teacher forward")
        context_states = model.textjepa(input_ids.gather(1, context_idx), position_ids=context_idx).last_hidden_state
        clock("student forward")
        predictions = model.predictor(context_states, context_idx, target_idx)
        loss = model.compute_loss(predictions, targets)
        per_dimension_std(targets), per_dimension_std(predictions)  # the collapse diagnostics
        clock("predictor + loss")
    loss.backward()
    clock("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock("optimizer")
    model.update_teacher(0.996)
    clock("EMA")


def mlm_split_step(model, optimizer, batch, precision, clock):
    input_ids, labels = batch
    with autocast(precision):
        loss = model(input_ids=input_ids, labels=labels).loss
    clock("forward (incl. LM head + CE)")
    loss.backward()
    clock("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock("optimizer")


def cost_split(size, vocab, precision, args, steps=6):
    """Median milliseconds per phase over `steps` steps of textjepa and of the equal-settings MLM."""
    jepa, jepa_opt = build_jepa(size, vocab, args.attn, args.seq)
    mlm, mlm_opt = build_mlm(size, vocab, args.attn, args.seq)
    jepa_batches = make_jepa_batches(vocab, args.batch, args.seq, 2)
    mlm_batches = make_mlm_batches(vocab, args.batch, args.seq, 2)
    variants = (
        ("textjepa", jepa, jepa_opt, jepa_split_step, jepa_batches),
        ("mlm", mlm, mlm_opt, mlm_split_step, mlm_batches),
    )
    phases = {name: {} for name, *_ in variants}
    for i in range(steps + 1):  # step 0 is warmup; the two models alternate step by step
        for name, model, optimizer, step, batches in variants:
            last = [time.perf_counter()]

            def clock(phase):
                now = time.perf_counter()
                if i > 0:
                    phases[name].setdefault(phase, []).append(now - last[0])
                last[0] = now

            step(model, optimizer, batches[i % len(batches)], precision, clock)
    return {name: {phase: statistics.median(t) * 1e3 for phase, t in p.items()} for name, p in phases.items()}


def split_table(size, vocab, precision, split):
    lines = [f"cost split, {size} vocab {vocab} {precision} (median ms per phase)", "",
             "| model | phase | ms | share |", "|---|---|---|---|"]
    for name, phases in split.items():
        total = sum(phases.values())
        for phase, ms in phases.items():
            lines.append(f"| {name} | {phase} | {ms:.0f} | {100 * ms / total:.0f}% |")
        lines.append(f"| {name} | **total** | {total:.0f} | |")
    return "\n".join(lines)


def markdown_table(rows):
    lines = [
        "| config | vocab | prec | textjepa tok/s | MLM tok/s (equal) | ratio | ratio best-of | MLM-HF tok/s "
        "| ratio vs HF | textjepa MFU | MLM MFU | peak GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hf = (f"{r['mlm-hf_tokens_per_s']:.0f} | {r['ratio_vs_mlm_hf']:.2f}x" if "ratio_vs_mlm_hf" in r else "- | -")
        lines.append(
            f"| {r['config']} | {r['vocab']} | {r['precision']} | {r['textjepa_tokens_per_s']:.0f} "
            f"| {r['mlm_tokens_per_s']:.0f} | **{r['ratio_vs_mlm']:.2f}x** | {r['ratio_vs_mlm_best']:.2f}x | {hf} "
            f"| {100 * r['textjepa_mfu']:.0f}% | {100 * r['mlm_mfu']:.0f}% | {r['peak_gflops']:.0f} |"
        )
    return "\n".join(lines)


def environment():
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="h256L4, vocab 8192, 2 rounds: a ~1-2 minute check")
    parser.add_argument("--configs", default="h256L4,h512L8", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--vocabs", default="30522,8192")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (CPU autocast)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention kernel, both models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and precision")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf-default", action="store_true", help="skip the MLM-with-HF-defaults variant")
    parser.add_argument("--split", default=None, metavar="CONFIG:VOCAB:PREC",
                        help="instead of the table, time the phases of each step, e.g. h256L4:8192:fp32")
    parser.add_argument("--json", default=None, help="write rows + environment here")
    parser.add_argument("--markdown", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.vocabs = "h256L4", "8192"
        args.rounds, args.steps, args.warmup = 3, 1, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precisions = args.precisions.split(",")
    unknown = [p for p in precisions if p not in ("fp32", "bf16")] + [
        c for c in args.configs.split(",") if c not in CONFIGS
    ]
    if unknown:
        raise SystemExit(f"throughput.py: unknown precision/config {unknown}; expected fp32,bf16 / {sorted(CONFIGS)}")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    if args.split:
        size, vocab, precision = args.split.split(":")
        split = cost_split(size, int(vocab), precision, args)
        print(split_table(size, vocab, precision, split))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": environment(), "split": split, "of": args.split}, f, indent=1)
        return 0

    rows = []
    started = time.time()
    for size in args.configs.split(","):
        for vocab in (int(v) for v in args.vocabs.split(",")):
            rows.extend(run_group(size, vocab, precisions, args, log))
            table = markdown_table(rows)
            env = environment() | {"seconds": time.time() - started, "argv": sys.argv[1:]}
            footer = (f"batch {args.batch} x seq {args.seq}, attention {args.attn}, {env['threads']} threads, "
                      f"torch {env['torch']}, {args.rounds} rounds x {args.steps} steps (median), "
                      f"{env['seconds']:.0f} s total")
            # written after every group, so a long run that is stopped keeps what it measured
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"environment": env, "rows": rows}, f, indent=1)
            if args.markdown:
                with open(args.markdown, "w") as f:
                    f.write(table + "\n\n" + footer + "\n")
    print(table)
    print("\n" + footer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
