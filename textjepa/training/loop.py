"""The pretraining loop (JEPA or MLM) on accelerate, top to bottom.

One optimizer step = grad_accum micro-batches inside `accelerator.accumulate`. After each optimizer
step (when `accelerator.sync_gradients`), and only then, the EMA teacher is updated from the
*unwrapped* student; the teacher is never passed to `prepare`, so DDP/FSDP never wrap it.
LR and weight decay are plain functions of the optimizer step written into the param groups (no
prepared scheduler that would step once per process). Every step's loss is averaged over processes
so that every process takes the same stop decisions (NaN guard, collapse guard, time budget).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .checkpoint import CheckpointError, TrainerState, load_checkpoint, save_checkpoint
from . import schedules
from .batches import JepaBatchMaker, MicroBatches, MlmBatchMaker, load_blocks, probe_blocks, resolve_tokenizer
from .build import build_model, build_optimizer, encoder_of
from .diagnostics import JsonlLog, check_guards, effective_rank
from .process import RunLock, RunLocked, die_with_launcher, fault_point

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class TrainingStopped(RuntimeError):
    """The NaN or collapse guard stopped the run; `.checkpoint` holds the state for inspection."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message + (f" (state saved in {checkpoint})" if checkpoint else ""))
        self.checkpoint = checkpoint


def _weights_finite(unwrapped) -> bool:
    """True when every parameter (student, predictor, teacher) is finite."""
    tensors = list(unwrapped.parameters()) + [b for b in unwrapped.buffers() if b.is_floating_point()]
    if hasattr(unwrapped, "teacher_state_dict"):  # the EMA teacher is not a registered submodule
        tensors += list(unwrapped.teacher_state_dict().values())
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def make_accelerator(recipe):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t = recipe.train
    trackers = [name for name in recipe.log.trackers if name != "jsonl"]
    # Without a GPU, cpu=True is what makes `accelerate launch --multi_gpu --num_processes N` give N
    # gloo processes (MULTI_CPU); with a GPU, `train.cpu: true` forces the CPU anyway.
    return Accelerator(
        cpu=t.cpu or not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=t.output_dir, logging_dir=str(Path(t.output_dir) / "logs")),
    )


def _reset_accelerate_state():
    """Let a later train() in the same Python process pick another precision / accumulation."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _flat_hparams(recipe) -> dict:
    flat = {}
    for section, values in recipe.to_dict().items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
        else:
            flat[section] = values
    return flat


@torch.no_grad()
def probe_effective_rank(model, probe_ids: torch.Tensor, device, chunk: int = 64) -> float:
    """RankMe of mean-pooled encoder states (teacher for JEPA, the encoder for MLM) on the probe batch."""
    from textjepa import pool_hidden_states

    encoder = encoder_of(model)
    was_training = encoder.training
    encoder.eval()
    pooled = []
    for start in range(0, len(probe_ids), chunk):
        ids = probe_ids[start:start + chunk].to(device)
        hidden = encoder(input_ids=ids).last_hidden_state  # (b, L, H)
        pooled.append(pool_hidden_states(hidden.float(), None, "mean"))  # (b, H)
    encoder.train(was_training)
    return effective_rank(torch.cat(pooled))


def _update_teacher(accelerator, model, momentum: float) -> None:
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type.name == "FSDP":  # untested here (no GPUs): full student params needed
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            unwrapped.update_teacher(momentum)
    else:
        unwrapped.update_teacher(momentum)


def train(recipe, resume: bool = False, model=None, announce=print) -> dict:
    """Run (or resume) the recipe; returns a summary dict. `model` replaces the recipe's freshly built
    model (same objective), e.g. to start from pretrained weights. Raises TrainingStopped when a guard
    fires (after saving a checkpoint), RunLocked when another run holds train.output_dir."""
    threads_before = torch.get_num_threads()
    with contextlib.ExitStack() as cleanup:
        try:
            return _train(recipe, resume, model, announce, cleanup)
        finally:
            torch.set_num_threads(threads_before)  # train.threads is for this run only
            _reset_accelerate_state()


def _lock_output_dir(accelerator, output_dir: Path, cleanup) -> None:
    """The main process takes the output_dir lock; every process fails together when it is held."""
    problem = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            cleanup.callback(RunLock(output_dir).acquire().release)
        except RunLocked as err:
            problem = str(err)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(torch.tensor([float(problem is not None)], device=accelerator.device), "sum")
        if problem is None and float(flag[0]) > 0:
            problem = f"{output_dir}: locked by another textjepa run (see the main process's message)"
    if problem:
        raise RunLocked(problem)


def _resume_point(accelerator, model, output_dir: Path, recipe) -> tuple[TrainerState | None, Path | None]:
    """Load the newest checkpoint that verifies and loads; newer broken ones are then set aside as
    checkpoint-<step>-corrupt (kept, never resumed) with a warning. (None, None) when there is no
    checkpoint; CheckpointError, with nothing moved, when none of them loads."""
    teacher_file = ckpt.TEACHER_FILE if recipe.objective == "jepa" else None
    failures = []  # (checkpoint, one line naming the bad file)
    for candidate in reversed(ckpt.list_checkpoints(output_dir)):
        problems = [ckpt.verify_checkpoint(candidate, teacher_file)]
        if accelerator.num_processes > 1:  # every process must pick the same checkpoint
            from accelerate.utils import gather_object

            problems = gather_object(problems)
        problem = next((p for p in problems if p), None)
        if problem is None:
            try:
                state = load_checkpoint(accelerator, model, candidate, recipe)
            except Exception as err:  # verified, yet a library refused it: name it and go on
                problem = f"{candidate}: cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]})"
        if problem is None:
            accelerator.wait_for_everyone()
            for bad, reason in failures if accelerator.is_main_process else []:
                moved = ckpt.set_aside(bad, ckpt.CORRUPT_SUFFIX)
                logger.warning("%s; set aside as %s, falling back to the previous checkpoint %s",
                               reason, moved.name, candidate.name)
            accelerator.wait_for_everyone()
            return state, candidate
        failures.append((candidate, problem))
    if failures:
        raise CheckpointError(f"{output_dir}: no loadable checkpoint; " + "; ".join(r for _, r in failures)
                              + " (move them away, or start over with --set train.overwrite=true)")
    return None, None


def _train(recipe, resume, model, announce, cleanup):
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    die_with_launcher()
    t, o, log_cfg = recipe.train, recipe.optim, recipe.log
    if t.threads:
        torch.set_num_threads(t.threads)
    accelerator = make_accelerator(recipe)
    is_main = accelerator.is_main_process
    say = announce if is_main else (lambda *a, **k: None)
    output_dir = Path(t.output_dir)
    _lock_output_dir(accelerator, output_dir, cleanup)
    existing = ckpt.list_checkpoints(output_dir)
    if existing and not resume:
        if not t.overwrite:
            raise FileExistsError(f"{output_dir} already holds {existing[-1].name}: pass --resume to continue it, "
                                  "or --set train.overwrite=true to delete it and start over, or pick another "
                                  "train.output_dir")
        accelerator.wait_for_everyone()
        if is_main:
            for path in existing + ckpt.list_diverged(output_dir) + [output_dir / "tokenizer", output_dir / "export"]:
                shutil.rmtree(path, ignore_errors=True)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.remove_stale_tmp(output_dir):
            say(f"removed half-written {stale.name} (interrupted save)")
        recipe.save(output_dir / "recipe.yaml")
    accelerator.wait_for_everyone()
    set_seed(t.seed)  # same seed on every process: identical init (DDP broadcasts rank 0's anyway)

    # ---- data: the main process tokenizes and caches first, the others then read its cache
    from textjepa.data import check_block_size

    check_block_size(recipe.data.block_size, recipe.model.max_position_embeddings or recipe.data.block_size)
    setup_start = time.perf_counter()
    with accelerator.main_process_first():
        tokenizer = resolve_tokenizer(recipe, output_dir, is_main)
        train_blocks, valid_blocks = load_blocks(recipe, tokenizer, output_dir)
    if recipe.objective == "jepa":
        from textjepa.masking import MaskingConfig

        mask_fields = {k: v for k, v in recipe.mask.__dict__.items()
                       if k not in ("special_tokens_never_target", "mlm_probability") and v is not None}
        if recipe.mask.special_tokens_never_target:
            mask_fields["special_token_ids"] = tuple(tokenizer.all_special_ids)
        if recipe.mask.num_views > 1 or recipe.mask.views != "none":  # views must know document boundaries
            from textjepa.data import separator_token_id

            mask_fields["separator_token_id"] = separator_token_id(tokenizer)
        make_batch = JepaBatchMaker(MaskingConfig(**mask_fields))
    else:
        make_batch = MlmBatchMaker(tokenizer, recipe.mask.mlm_probability)
    micro_batches = MicroBatches(train_blocks, t.batch_size, t.grad_accum, accelerator.process_index,
                                 accelerator.num_processes, t.seed, make_batch)
    probe_ids = probe_blocks(train_blocks, valid_blocks, log_cfg.probe_size)
    tokens_per_step = t.batch_size * t.grad_accum * accelerator.num_processes * recipe.data.block_size

    # ---- model, optimizer (the teacher stays outside prepare)
    if model is None:
        model = build_model(recipe, tokenizer)
    model.to(accelerator.device)
    model.train()
    optimizer = build_optimizer(model, recipe, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    n_params = sum(p.numel() for p in unwrapped.parameters())

    state, latest = _resume_point(accelerator, model, output_dir, recipe) if resume else (None, None)
    diverged = [p for p in ckpt.list_diverged(output_dir)
                if latest is None or int(p.name.split("-")[1]) > int(latest.name.split("-")[1])]
    if latest is not None:
        say(f"resumed from {latest} at step {state.step}"
            + (f" (the last finite checkpoint; {diverged[-1].name}, saved when the run diverged, is kept for "
               "inspection and skipped)" if diverged else ""))
    else:
        state = TrainerState(world_size=accelerator.num_processes)
        if resume:
            say(f"--resume: no checkpoint to resume from in {output_dir}"
                + (f" ({diverged[-1].name} holds a diverged state and is skipped)" if diverged else "")
                + "; starting from scratch")
        if recipe.objective == "jepa":
            _update_teacher(accelerator, model, 0.0)  # teacher := the (broadcast) student

    metrics_log = JsonlLog(output_dir / METRICS_FILE) if is_main and "jsonl" in log_cfg.trackers else None
    if metrics_log is not None:
        if state.step == 0:
            metrics_log.path.unlink(missing_ok=True)
        else:
            metrics_log.truncate_after(state.step)
    if any(name != "jsonl" for name in log_cfg.trackers):  # tensorboard, wandb, ... via accelerate
        accelerator.init_trackers("tensorboard", config=_flat_hparams(recipe))

    say(f"textjepa {recipe.objective}: {n_params / 1e6:.2f} M trainable parameters, {len(train_blocks)} train "
        f"blocks of {recipe.data.block_size} tokens, {t.max_steps} steps x {tokens_per_step} tokens "
        f"({accelerator.num_processes} process(es), {accelerator.device}, precision {t.mixed_precision}); "
        f"setup {time.perf_counter() - setup_start:.1f}s")

    # ---- the batch stream starts where the last optimizer step ended
    loader = torch.utils.data.DataLoader(
        micro_batches, batch_size=None, sampler=range(state.step * t.grad_accum, t.max_steps * t.grad_accum),
        num_workers=recipe.data.num_workers, pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(t.seed),  # never touch the global RNG (exact resume)
    )
    batches = iter(loader)
    guard_after = log_cfg.guard_after if log_cfg.guard_after is not None else o.warmup_steps
    stop_after = t.stop_after if t.stop_after is not None else t.max_steps
    session_start = time.perf_counter()
    elapsed_before = state.elapsed_s
    window_start, window_tokens = time.perf_counter(), 0
    history = []  # logged records of this session (main process)
    progress = tqdm(total=t.max_steps, initial=state.step, disable=not (is_main and log_cfg.progress_bar),
                    desc=f"{recipe.objective} pretraining", dynamic_ncols=True)
    stop_reason, end_reason = None, "max_steps"

    while state.step < min(t.max_steps, stop_after):
        step = state.step  # optimizer step about to run (0-based)
        lr = schedules.learning_rate(step, t.max_steps, o.warmup_steps, o.lr, o.min_lr)
        wd = schedules.weight_decay(step, t.max_steps, o.weight_decay, o.weight_decay_end)
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["apply_decay"] else 0.0

        # loss, target_std, prediction_std and the model's loss terms, summed over micro-batches by name
        sums = {}
        grad_norm = None
        for _ in range(t.grad_accum):
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    max_norm = o.grad_clip if o.grad_clip > 0 else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            fault_point("step", step)
            figures = {"loss": out.loss}
            if recipe.objective == "jepa":
                figures.update(target_std=out.target_std, prediction_std=out.prediction_std, **out.loss_terms)
            for name, value in figures.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        if not accelerator.sync_gradients:  # accumulate() must have synced on the last micro-batch
            raise RuntimeError(f"step {step}: gradients were not synchronised after {t.grad_accum} micro-batches")

        momentum = None
        if recipe.objective == "jepa" and recipe.ema.schedule != "frozen":
            momentum = unwrapped.ema_momentum(step, t.max_steps)
            _update_teacher(accelerator, model, momentum)
            state.ema_updates += 1
        state.step += 1
        state.tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        progress.update(1)

        # Same figures and the same decisions on every process: one small all-reduce per step.
        time_up = t.max_minutes is not None and (time.perf_counter() - session_start) > 60 * t.max_minutes
        names = sorted(sums)  # the same names on every process: the config decides them
        shared = torch.stack([sums[name] / t.grad_accum for name in names]
                             + [torch.tensor(float(time_up), device=accelerator.device)])
        shared = accelerator.reduce(shared, reduction="sum")
        world = accelerator.num_processes
        metrics = {"step": state.step, "lr": lr, "weight_decay": wd}
        metrics.update({name: float(shared[i]) / world for i, name in enumerate(names)})
        if recipe.objective == "jepa":
            metrics["momentum"] = momentum
        time_up = float(shared[-1]) > 0
        session_ends = time_up or state.step >= min(t.max_steps, stop_after)  # log final figures
        is_log_step = state.step % log_cfg.every == 0 or state.step == 1 or session_ends
        is_diag_step = state.step % log_cfg.diag_every == 0 or session_ends
        if is_diag_step:
            rank_value = torch.zeros(1, device=accelerator.device)
            if is_main:
                rank_value += probe_effective_rank(unwrapped, probe_ids, accelerator.device)
            metrics["effective_rank"] = float(accelerator.reduce(rank_value, reduction="sum"))
        if is_log_step or is_diag_step:
            now = time.perf_counter()
            metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else None
            metrics["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
            metrics["tokens_seen"] = state.tokens_seen
            metrics["elapsed_s"] = elapsed_before + now - session_start
            window_start, window_tokens = now, 0
            if metrics_log is not None:
                metrics_log.write(metrics)
            if accelerator.trackers:
                accelerator.log({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=state.step)
            history.append(metrics)
            state.last_metrics = metrics
            progress.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "target_std", "effective_rank")
                                  if metrics.get(k) is not None}, refresh=False)

        # Collapse is a JEPA failure; MLM's mean-pooled states are anisotropic (low rank) by nature,
        # so for MLM only the NaN/Inf guard applies.
        stop_reason = check_guards(state.step, metrics,
                                   guard_active=recipe.objective == "jepa" and state.step > guard_after,
                                   min_std=log_cfg.min_std, min_rank=log_cfg.min_rank)
        is_save_step = state.step % t.save_every == 0 and state.step < t.max_steps
        if not stop_reason and (is_save_step or session_ends) and not _weights_finite(unwrapped):
            # a finite loss computed before the update does not prove the updated weights finite
            stop_reason = f"step {state.step}: the weights hold NaN/Inf after the optimizer step; stopping"
        if stop_reason:
            state.last_metrics = metrics
            break
        if is_save_step:
            state.elapsed_s = elapsed_before + time.perf_counter() - session_start
            save_checkpoint(accelerator, model, output_dir, state, recipe, tokenizer)
        if time_up:
            end_reason = f"train.max_minutes={t.max_minutes} reached"
            break
    else:
        if state.step < t.max_steps:
            end_reason = f"train.stop_after={t.stop_after} reached"
    progress.close()

    state.elapsed_s = elapsed_before + time.perf_counter() - session_start
    diverged_stop = bool(stop_reason) and (not math.isfinite(state.last_metrics.get("loss", 0.0))
                                           or not _weights_finite(unwrapped))
    last_checkpoint = save_checkpoint(accelerator, model, output_dir, state, recipe, tokenizer,
                                      diverged=diverged_stop)
    if stop_reason:
        if diverged_stop:
            finite = ckpt.latest_checkpoint(output_dir)
            stop_reason += (f"; the last finite checkpoint is {finite.name} (--resume restarts from it)" if finite
                            else "; there is no finite checkpoint yet (--resume starts from scratch)")
        say(f"STOPPED: {stop_reason}\n  state saved in {last_checkpoint}")
        accelerator.end_training()
        raise TrainingStopped(stop_reason, last_checkpoint)

    summary = {"objective": recipe.objective, "steps": state.step, "max_steps": t.max_steps,
               "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed_s, "end_reason": end_reason,
               "checkpoint": str(last_checkpoint), "parameters": n_params, "final_metrics": state.last_metrics,
               "first_metrics": history[0] if history else None,
               "tokens_per_s_mean": _mean_throughput(history)}
    if is_main:
        if t.export:
            from .export import export_model

            export_dir = output_dir / "export"
            export_model(unwrapped, recipe, tokenizer, export_dir, which=t.export_which, trainer_state=state)
            summary["export"] = str(export_dir)
            if t.export_whiten_on:  # post-processing shipped inside the export (SentenceEncoder applies it)
                from textjepa.evaluation.whitening import ship_whitening

                from .batches import text_source

                source = text_source(t.export_whiten_on, output_dir)
                summary["whitening"] = ship_whitening(export_dir, source, t.export_whiten_docs)
        if log_cfg.plot and metrics_log is not None:
            from .plots import plot_training_curves

            png = plot_training_curves(metrics_log.path, output_dir / "training_curves.png",
                                       title=f"{recipe.objective} - {t.output_dir}")
            summary["plot"] = str(png) if png else None
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


LOSS_TERMS = ("token_loss", "span_loss", "sentence_loss", "cross_view_loss", "bottleneck_loss", "pooled_reg")  # model's loss_terms


def _mean_throughput(history: list[dict]) -> float | None:
    # skip the first record (includes warm-up/compilation) when there are others
    values = [r["tokens_per_s"] for r in history[1:] or history if r.get("tokens_per_s")]
    return sum(values) / len(values) if values else None


def format_summary(summary: dict) -> str:
    """A short human summary for the end of a run."""
    final, first = summary.get("final_metrics") or {}, summary.get("first_metrics") or {}

    def fmt(value):
        return "n/a" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))

    lines = [
        f"done: {summary['objective']} pretraining, {summary['steps']}/{summary['max_steps']} steps "
        f"({summary['end_reason']}), {summary['tokens_seen'] / 1e6:.2f} M tokens in {summary['elapsed_s'] / 60:.1f} min "
        f"({fmt(summary.get('tokens_per_s_mean'))} tokens/s)",
        f"  loss {fmt(first.get('loss'))} (step {first.get('step')}) -> {fmt(final.get('loss'))} (step {final.get('step')})",
    ]
    if summary["objective"] == "jepa":
        lines.append(f"  target std {fmt(final.get('target_std'))}, prediction std {fmt(final.get('prediction_std'))}, "
                     f"EMA momentum {fmt(final.get('momentum'))}")
        terms = [f"{name} {fmt(final[name])}" for name in LOSS_TERMS if final.get(name) is not None]
        if terms:
            lines.append("  loss terms (unweighted): " + ", ".join(terms))
    lines.append(f"  effective rank of pooled {'teacher' if summary['objective'] == 'jepa' else 'encoder'} "
                 f"embeddings (probe batch): {fmt(final.get('effective_rank'))}")
    lines.append(f"  checkpoint: {summary['checkpoint']}")
    if summary.get("export"):
        lines.append(f"  exported encoder: {summary['export']}  (AutoModel.from_pretrained loads it)")
    if summary.get("plot"):
        lines.append(f"  training curves: {summary['plot']}")
    return "\n".join(lines)
