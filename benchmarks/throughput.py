"""Throughput of one textjepa pretraining step vs HF RobertaForMaskedLM, side by side in ONE process.

    python benchmarks/throughput.py --quick                        # ~1-2 min: h256 L4, vocab 8192 (issue 2)
    python benchmarks/throughput.py --json throughput.json         # full table (issue 6), tens of minutes
    python benchmarks/throughput.py --device cuda --configs h768L12 --vocabs 30522 --precisions bf16 \
        --batch 32 --seq 512 --rounds 5 --steps 5                  # base size on a GPU (benchmarks/gpu_check.sh)

What one step is (both models, same batch B x L, same fused AdamW, same precision/attention):
  textjepa: the trainer's step with a recipe's settings: everything but the encoder sizes (which come
            from the config, e.g. h256L4) is read from --recipe (default: the recipe of that size,
            RECIPE_OF_CONFIG: recipes/small.yaml for h256L4): the predictor, the loss terms (token,
            sentence, cross-view, ...) and the mask section (views, K masks per teacher pass, target
            ratio, spans), built by the trainer's own batches.masking_config and build.jepa_config.
            One step = teacher forward (no grad) + student forward on the visible tokens + predictor
            + losses + backward + AdamW step + EMA teacher update (foreach lerp).
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
  with V views a block is V rows of L/V tokens (R = B*V rows of T = L/V tokens; V=1: R=B, T=L):
  textjepa = 1 x encoder(R, T)                                  teacher, forward only
           + 3 x encoder(R*K, Nc)                               student on visible tokens
           + 3 x [2 R K Nc H Hp                                 predictor input projection
                  + encoder_p(B*K, Nc + Nt, last layer: Nt queries) predictor layers (width Hp, FFN Fp);
                                                                the last layer computes the Nt mask tokens'
                                                                outputs only (Q, output, MLP on Nt rows; K, V
                                                                on all Nc + Nt; scores Nt x (Nc + Nt))
                  + 2 R K Nt Hp H]                              output projection, targets only
             (the predictor terms are 0 with token_loss_weight = span_loss_weight = 0; the pooled
             heads of the sentence / cross-view targets are a few small MLPs, not counted)
  mlm      = 3 x [encoder(B, L) + 2 B L (H^2 + H V)]            RoBERTa LM head on every token
(The teacher runs every token through its last layer too: the default sentence target reads them all.)
"flop ratio" = mlm / textjepa FLOPs per step: the tokens/s ratio that equal MFU would give.
MFU = model FLOPs / step seconds / peak, where the peak is a large torch.mm measured in the same
rounds: fp32 steps against the fp32 peak, bf16-autocast steps against the bf16 peak.

--device cuda: models, optimizer state and batches live on the GPU; every timed region starts and ends
with torch.cuda.synchronize(); autocast runs with device_type "cuda"; TF32 matmuls are allowed (the
trainer allows them too), so the fp32 rows and the fp32 peak are TF32 figures; the matmul peak is a
8192^3 torch.mm on the GPU. bf16 rows also get "MFU (spec)": against the card's dense bf16 datasheet
peak (SPEC_BF16_TFLOPS, keyed on torch.cuda.get_device_name()), beside the measured-peak MFU. Peak
memory per variant = its persistent state (weights, EMA teacher, optimizer moments) + the largest
growth of torch.cuda.max_memory_allocated during its steps, i.e. what the variant alone would need.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import torch

from transformers import RobertaForMaskedLM

from textjepa import TextJepaForPreTraining
from textjepa.data import load_tokenizer
from textjepa.masking import SpanMaskCollator
from textjepa import optimization
from textjepa.objectives import per_dimension_std
from textjepa.training import batches as trainer_batches
from textjepa.training import build
from textjepa.training.recipe import load_recipe

CONFIGS = {
    # name: (hidden, layers, heads, ffn)
    "h128L4": (128, 4, 4, 512),  # mini: the quickstart's encoder
    "h256L4": (256, 4, 4, 1024),
    "h512L8": (512, 8, 8, 2048),
    "h768L12": (768, 12, 12, 3072),  # base size, for a GPU
}
# The recipe whose non-size settings (predictor, loss terms, masks) each config's textjepa step uses
RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "recipes")
RECIPE_OF_CONFIG = {"h128L4": "quickstart.yaml", "h256L4": "small.yaml", "h512L8": "small.yaml",
                    "h768L12": "base.yaml"}
# Dense bf16 tensor-core peaks from the datasheets, TFLOP/s (no sparsity), matched in this order as
# substrings of torch.cuda.get_device_name(): the first hit wins, so the specific names come first.
SPEC_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),  # H200 SXM: the tensor cores of H100 SXM
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" = SXM
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
)
MASK_TOKEN_ID = 4  # RoBERTa-like tokenizers: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4
PAD_TOKEN_ID = 1


# ----------------------------------------------------------------------------------------------
# Data: a few fixed random batches per vocabulary, built before any timing
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def shipped_tokenizer():
    """The quickstart tokenizer shipped in the package: only its special ids are used (<s>=0 <pad>=1
    </s>=2 <unk>=3 <mask>=4, as MASK_TOKEN_ID / PAD_TOKEN_ID assume), for the recipe's masks."""
    return load_tokenizer(trainer_batches.SHIPPED_TOKENIZER)


def make_jepa_batches(recipe, vocab, batch, length, count, seed=0, device="cpu"):
    """count batches as the trainer's collator builds them from the recipe's mask section: input_ids
    (R, T) with R = B*V rows of T = L/V tokens, context_idx (R, K, Nc), target_idx (R, K, Nt), plus
    what views add (same_document); built on the CPU (the same numbers for every device), then moved."""
    masking = trainer_batches.masking_config(recipe, shipped_tokenizer())
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        ids = torch.randint(5, vocab, (batch, length), generator=generator)  # no separator: one document
        out = SpanMaskCollator(masking, seed=seed + i)([{"input_ids": row} for row in ids])
        batches.append({k: v.to(device) for k, v in out.items() if torch.is_tensor(v)})
    return batches


def make_mlm_batches(vocab, batch, length, count, ratio=0.15, seed=0, device="cpu"):
    """count batches of (masked input_ids (B, L), labels (B, L) with -100 outside the 15%)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    num_masked = round(ratio * length)
    for _ in range(count):
        ids = torch.randint(5, vocab, (batch, length), generator=generator)
        positions = torch.rand(batch, length, generator=generator).argsort(dim=1)[:, :num_masked]
        is_masked = torch.zeros(batch, length, dtype=torch.bool).scatter_(1, positions, True)
        labels = torch.where(is_masked, ids, torch.full_like(ids, -100))
        batches.append((ids.masked_fill(is_masked, MASK_TOKEN_ID).to(device), labels.to(device)))
    return batches


# ----------------------------------------------------------------------------------------------
# Models and one training step each
# ----------------------------------------------------------------------------------------------


def adamw(model):
    # fused AdamW (one kernel over all params) where torch supports it, else foreach
    return optimization.adamw(model.parameters(), lr=1e-4, weight_decay=0.01)


def recipe_for(size, path=None):
    """--recipe, or the shipped recipe of this size (RECIPE_OF_CONFIG)."""
    return load_recipe(path or os.path.join(RECIPES, RECIPE_OF_CONFIG[size]))


def build_jepa(size, vocab, attn, length, recipe, device="cpu"):
    """TextJepaForPreTraining as the trainer builds it from `recipe` (build.jepa_config), with this
    config's encoder sizes and vocabulary, dropout 0 and the given attention kernel (as for MLM)."""
    hidden, layers, heads, ffn = CONFIGS[size]
    config = build.jepa_config(recipe, shipped_tokenizer())
    config.update(dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=max(512, length), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    config._attn_implementation = attn
    model = TextJepaForPreTraining(config).train()
    model.teacher  # create the EMA teacher now, not inside the first timed step
    model.to(device)  # the teacher follows (TextJepaForPreTraining._apply)
    return model, adamw(model)


def build_mlm(size, vocab, attn, length, hf_defaults=False, device="cpu"):
    hidden, layers, heads, ffn = CONFIGS[size]
    kwargs = {}
    if not hf_defaults:  # equal settings: no dropout, the same attention kernel as textjepa
        kwargs.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn)
    config = build.roberta_config(vocab, hidden, layers, heads, ffn, max(512, length), PAD_TOKEN_ID, 0, 2, **kwargs)
    model = RobertaForMaskedLM(config).train().to(device)
    return model, adamw(model)


def autocast(precision, device_type="cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def device_type(batch):
    """"cpu" or "cuda": where the step's tensors live (autocast needs the device type)."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return first.device.type


def synchronize(device):
    """Wait for the GPU's queued work (a no-op on the CPU): closes every timed region on CUDA."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def jepa_step(model, optimizer, batch, precision):
    with autocast(precision, device_type(batch)):
        loss = model(**batch).loss  # as the trainer calls it
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_teacher(0.996)


def mlm_step(model, optimizer, batch, precision):
    input_ids, labels = batch
    with autocast(precision, device_type(batch)):
        loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_bytes(model, optimizer):
    """Bytes of what a variant keeps between steps: weights, buffers, the EMA teacher, optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    if getattr(model, "_teacher", None) is not None:
        tensors += list(model._teacher.state_dict().values())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------
# FLOPs and peaks
# ----------------------------------------------------------------------------------------------


def encoder_forward_flops(rows, tokens, hidden, layers, ffn, last_queries=None):
    """Forward FLOPs of `layers` encoder layers on rows x tokens; last_queries: the last layer computes
    only that many tokens' outputs (queries, attention output, MLP), keys and values still from all."""
    per_layer_weights = 4 * hidden * hidden + 2 * hidden * ffn
    full = 2 * rows * tokens * per_layer_weights + 4 * rows * tokens * tokens * hidden
    if last_queries is None or layers == 0:
        return layers * full
    q = last_queries
    last = (2 * rows * (q * hidden * hidden + tokens * 2 * hidden * hidden + q * hidden * hidden + q * 2 * hidden * ffn)
            + 4 * rows * q * tokens * hidden)
    return (layers - 1) * full + last


def jepa_step_flops(config, rows, length, num_masks, num_context, num_target):
    """rows x length: the teacher's input (with views: B*V segments of L/V tokens)."""
    h, hp = config.hidden_size, config.predictor_hidden_size
    teacher = encoder_forward_flops(rows, length, h, config.num_hidden_layers, config.intermediate_size)
    rows = rows * num_masks
    student = encoder_forward_flops(rows, num_context, h, config.num_hidden_layers, config.intermediate_size)
    if config.token_loss_weight == 0 and config.span_loss_weight == 0:  # the forward skips the predictor
        return teacher + 3 * student
    predictor = (
        2 * rows * num_context * h * hp
        + encoder_forward_flops(rows, num_context + num_target, hp, config.predictor_num_hidden_layers,
                                config.predictor_intermediate_size, last_queries=num_target)
        + 2 * rows * num_target * hp * h
    )
    return teacher + 3 * student + 3 * predictor


def mlm_step_flops(config, batch, length):
    h = config.hidden_size
    encoder = encoder_forward_flops(batch, length, h, config.num_hidden_layers, config.intermediate_size)
    head = 2 * batch * length * (h * h + h * config.vocab_size)
    return 3 * (encoder + head)


MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # big enough to reach each device's peak


def matmul_seconds(dtype, size=2048, repeats=4, device="cpu"):
    """Seconds per (size x size) @ (size x size) torch.mm; the best of `repeats` after a warmup. On CUDA
    each repeat times 10 back-to-back products between two synchronize() calls (launch cost hidden)."""
    a = torch.randn(size, size).to(device=device, dtype=dtype)
    b = torch.randn(size, size).to(device=device, dtype=dtype)
    torch.mm(a, b)
    inner = 10 if torch.device(device).type == "cuda" else 1
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def spec_bf16_tflops(device):
    """(device name, datasheet dense bf16 TFLOP/s or None) for a CUDA device; (None, None) on the CPU."""
    if torch.device(device).type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return name, next((tflops for key, tflops in SPEC_BF16_TFLOPS if key in name), None)


def resolve_device(name):
    """--device: "cpu", "cuda" (fails without a GPU) or "auto" (cuda when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("throughput.py: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# The interleaved benchmark
# ----------------------------------------------------------------------------------------------


def run_group(size, vocab, precisions, args, log):
    """All variants of one (size, vocab): models built once, rounds interleave every variant."""
    batch, length, device = args.batch, args.seq, args.device
    on_cuda = device.type == "cuda"
    matmul_size = args.matmul_size or MATMUL_SIZE[device.type]
    recipe = recipe_for(size, args.recipe)
    jepa, jepa_opt = build_jepa(size, vocab, args.attn, length, recipe, device)
    mlm, mlm_opt = build_mlm(size, vocab, args.attn, length, device=device)
    jepa_batches = make_jepa_batches(recipe, vocab, batch, length, 3, device=device)
    variants = [("textjepa", jepa, jepa_opt, jepa_step, jepa_batches)]
    mlm_batches = make_mlm_batches(vocab, batch, length, 3, device=device)
    variants.append(("mlm", mlm, mlm_opt, mlm_step, mlm_batches))
    if not args.no_hf_default:
        mlm_hf, mlm_hf_opt = build_mlm(size, vocab, args.attn, length, hf_defaults=True, device=device)
        variants.append(("mlm-hf", mlm_hf, mlm_hf_opt, mlm_step, mlm_batches))
    hf_attn = variants[-1][1].config._attn_implementation

    # warmup: first steps allocate optimizer state and fill allocator caches
    for name, model, optimizer, step, batches in variants:
        for precision in precisions:
            for i in range(args.warmup):
                step(model, optimizer, batches[i % len(batches)], precision)
    synchronize(device)

    times = {(name, p): [] for name, *_ in variants for p in precisions}
    peak_times = {p: [] for p in precisions}
    memory = {(name, p): 0 for name, *_ in variants for p in precisions}  # bytes, CUDA only
    counter = 0
    for round_index in range(args.rounds):
        for precision in precisions:
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            peak_times[precision].append(matmul_seconds(dtype, matmul_size, device=device))
            for name, model, optimizer, step, batches in variants:
                if on_cuda:
                    synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    resident = torch.cuda.memory_allocated(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(model, optimizer, batches[counter % len(batches)], precision)
                    counter += 1
                synchronize(device)
                times[(name, precision)].append((time.perf_counter() - start) / args.steps)
                if on_cuda:  # what this variant alone needs: its state + its steps' transient growth
                    growth = torch.cuda.max_memory_allocated(device) - resident
                    memory[(name, precision)] = max(memory[(name, precision)], state_bytes(model, optimizer) + growth)
        log(f"  {size} v{vocab} round {round_index + 1}/{args.rounds}: "
            + ", ".join(f"{n}/{p} {statistics.median(t) * 1e3:.0f} ms" for (n, p), t in times.items()))

    first = jepa_batches[0]  # input_ids (R, T), context_idx (R, K, Nc), target_idx (R, K, Nt)
    context_idx, target_idx = first["context_idx"], first["target_idx"]
    jepa_flops = jepa_step_flops(jepa.config, *first["input_ids"].shape, *context_idx.shape[1:], target_idx.shape[2])
    mlm_flops = mlm_step_flops(mlm.config, batch, length)
    device_name, spec_tflops = spec_bf16_tflops(device)
    matmul_flops = 2 * matmul_size**3
    rows = []
    for precision in precisions:
        peak = matmul_flops / statistics.median(peak_times[precision])  # FLOP/s
        seconds = {name: statistics.median(times[(name, precision)]) for name, *_ in variants}
        row = {
            "config": size, "vocab": vocab, "precision": precision, "attn": args.attn, "hf_default_attn": hf_attn,
            "device": device.type, "batch": batch, "seq": length, "rounds": args.rounds, "steps_per_round": args.steps,
            "recipe": os.path.basename(args.recipe or RECIPE_OF_CONFIG[size]),
            "views": int(first["input_ids"].shape[0] // batch), "num_masks": int(context_idx.shape[1]),
            "num_context": int(context_idx.shape[2]), "num_target": int(target_idx.shape[2]),
            "peak_gflops": peak / 1e9, "matmul_size": matmul_size,
            "textjepa_gflop_per_step": jepa_flops / 1e9, "mlm_gflop_per_step": mlm_flops / 1e9,
            "flop_ratio": mlm_flops / jepa_flops,  # the tokens/s ratio at equal MFU
        }
        for name, secs in seconds.items():
            row[f"{name}_ms"] = secs * 1e3
            row[f"{name}_tokens_per_s"] = batch * length / secs
            row[f"{name}_all_ms"] = [t * 1e3 for t in times[(name, precision)]]
        row["textjepa_mfu"] = jepa_flops / seconds["textjepa"] / peak
        row["mlm_mfu"] = mlm_flops / seconds["mlm"] / peak
        row["ratio_vs_mlm"] = seconds["mlm"] / seconds["textjepa"]
        row["ratio_over_flop_ratio"] = row["ratio_vs_mlm"] / row["flop_ratio"]
        if "mlm-hf" in seconds:
            row["mlm-hf_mfu"] = mlm_flops / seconds["mlm-hf"] / peak
            row["ratio_vs_mlm_hf"] = seconds["mlm-hf"] / seconds["textjepa"]
        # per-round ratios show how stable the median ratio is; the best-of ratio (fastest round of
        # each) is the least disturbed by other processes on a shared machine
        row["ratio_vs_mlm_per_round"] = [m / j for m, j in zip(times[("mlm", precision)], times[("textjepa", precision)])]
        row["ratio_vs_mlm_best"] = min(times[("mlm", precision)]) / min(times[("textjepa", precision)])
        row["textjepa_mfu_best"] = jepa_flops / min(times[("textjepa", precision)]) / (matmul_flops / min(peak_times[precision]))
        if on_cuda:
            row["device_name"] = device_name
            for name, *_ in variants:
                row[f"{name}_peak_mem_gb"] = memory[(name, precision)] / 2**30
            if precision == "bf16" and spec_tflops:  # against the datasheet's dense bf16 peak
                row["spec_bf16_tflops"] = spec_tflops
                for name in seconds:
                    flops = jepa_flops if name == "textjepa" else mlm_flops
                    row[f"{name}_mfu_spec"] = flops / seconds[name] / (spec_tflops * 1e12)
        rows.append(row)
    return rows


def jepa_split_step(model, optimizer, batch, precision, clock):
    """One textjepa step cut into phases: the token path only (the first of the K masks, no pooled
    sentence / cross-view targets), each closed by clock(phase) so the cost split can be read off."""
    input_ids = batch["input_ids"]
    context_idx, target_idx = batch["context_idx"][:, 0], batch["target_idx"][:, 0]  # (R, Nc), (R, Nt)
    with autocast(precision, device_type(batch)):
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
    with autocast(precision, device_type(batch)):
        loss = model(input_ids=input_ids, labels=labels).loss
    clock("forward (incl. LM head + CE)")
    loss.backward()
    clock("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock("optimizer")


def cost_split(size, vocab, precision, args, steps=6):
    """Median milliseconds per phase over `steps` steps of textjepa and of the equal-settings MLM."""
    device = args.device
    recipe = recipe_for(size, args.recipe)
    jepa, jepa_opt = build_jepa(size, vocab, args.attn, args.seq, recipe, device)
    mlm, mlm_opt = build_mlm(size, vocab, args.attn, args.seq, device=device)
    jepa_batches = make_jepa_batches(recipe, vocab, args.batch, args.seq, 2, device=device)
    mlm_batches = make_mlm_batches(vocab, args.batch, args.seq, 2, device=device)
    variants = (
        ("textjepa", jepa, jepa_opt, jepa_split_step, jepa_batches),
        ("mlm", mlm, mlm_opt, mlm_split_step, mlm_batches),
    )
    phases = {name: {} for name, *_ in variants}
    for i in range(steps + 1):  # step 0 is warmup; the two models alternate step by step
        for name, model, optimizer, step, batches in variants:
            synchronize(device)
            last = [time.perf_counter()]

            def clock(phase):
                synchronize(device)  # on CUDA: the phase's kernels have run
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
    """The main table; rows measured on a GPU add MFU against the datasheet peak and peak memory."""
    gpu = any(r.get("device") == "cuda" for r in rows)
    header = ("| config | vocab | prec | textjepa tok/s | MLM tok/s (equal) | ratio | FLOP ratio | ratio best-of "
              "| MLM-HF tok/s | ratio vs HF | textjepa MFU | MLM MFU | peak GFLOP/s |")
    if gpu:
        header += " textjepa MFU (spec) | MLM MFU (spec) | spec TFLOP/s | textjepa mem GB | MLM mem GB |"
    lines = [header, "|" + "---|" * header.count(" |")]

    def percent(value):
        return "-" if value is None else f"{100 * value:.0f}%"

    for r in rows:
        hf = (f"{r['mlm-hf_tokens_per_s']:.0f} | {r['ratio_vs_mlm_hf']:.2f}x" if "ratio_vs_mlm_hf" in r else "- | -")
        line = (
            f"| {r['config']} | {r['vocab']} | {r['precision']} | {r['textjepa_tokens_per_s']:.0f} "
            f"| {r['mlm_tokens_per_s']:.0f} | **{r['ratio_vs_mlm']:.2f}x** | {r['flop_ratio']:.2f}x "
            f"| {r['ratio_vs_mlm_best']:.2f}x | {hf} "
            f"| {100 * r['textjepa_mfu']:.0f}% | {100 * r['mlm_mfu']:.0f}% | {r['peak_gflops']:.0f} |"
        )
        if gpu:
            spec = r.get("spec_bf16_tflops")
            line += (f" {percent(r.get('textjepa_mfu_spec'))} | {percent(r.get('mlm_mfu_spec'))} "
                     f"| {spec if spec else '-'} | {r.get('textjepa_peak_mem_gb', 0):.1f} "
                     f"| {r.get('mlm_peak_mem_gb', 0):.1f} |")
        lines.append(line)
    return "\n".join(lines)


def environment(device=None):
    env = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }
    if device is not None and device.type == "cuda":
        name, spec = spec_bf16_tflops(device)
        env.update(device=name, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   spec_bf16_tflops=spec, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   max_memory_allocated_gb=torch.cuda.max_memory_allocated(device) / 2**30,
                   memory_total_gb=torch.cuda.get_device_properties(device).total_memory / 2**30)
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="h256L4, vocab 8192, 2 rounds: a ~1-2 minute check")
    parser.add_argument("--configs", default="h128L4,h256L4", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--vocabs", default="30522,8192")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (autocast)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where models and batches live (auto: cuda when available)")
    parser.add_argument("--recipe", default=None,
                        help="recipe whose predictor, loss terms and masks the textjepa step uses (default: "
                             "the shipped recipe of each config's size, RECIPE_OF_CONFIG)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention kernel, both models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and precision")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=None,
                        help=f"side of the square matmul that measures the peak (default {MATMUL_SIZE})")
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
    args.device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device.type == "cuda":  # as the trainer does on CUDA: fp32 matmuls/convolutions on TF32 cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
                json.dump({"environment": environment(args.device), "split": split, "of": args.split}, f, indent=1)
        return 0

    rows = []
    started = time.time()
    for size in args.configs.split(","):
        for vocab in (int(v) for v in args.vocabs.split(",")):
            rows.extend(run_group(size, vocab, precisions, args, log))
            if args.device.type == "cuda":
                torch.cuda.empty_cache()  # the group's models are gone: hand their blocks back
            table = markdown_table(rows)
            env = environment(args.device) | {"seconds": time.time() - started, "argv": sys.argv[1:]}
            where = f"{env['device']} (CUDA {env['cuda']}), " if args.device.type == "cuda" else ""
            footer = (f"{where}batch {args.batch} x seq {args.seq}, attention {args.attn}, {env['threads']} threads, "
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
