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
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from textjepa.objectives import LOSS_TERM_NAMES

from . import checkpoint as ckpt
from .checkpoint import CheckpointError, TrainerState, load_checkpoint, save_checkpoint
from . import schedules
from .batches import micro_batch_loader, training_data
from .build import build_model, build_optimizer, encoder_of
from .compiling import CompileWatch, compile_errors, compile_forward
from .diagnostics import JsonlLog, check_guards, effective_rank
from .process import RunLock, RunLocked, die_with_launcher, fault_point

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class TrainingStopped(RuntimeError):
    """The NaN or collapse guard stopped the run; `.checkpoint` holds the state for inspection."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message + (f" (state saved in {checkpoint})" if checkpoint else ""))
        self.checkpoint = checkpoint


def _weights_finite(accelerator, unwrapped) -> bool:
    """True when every parameter (student, predictor, teacher) is finite on every process (FSDP: each
    process checks its shards, the answer is shared; all processes call this)."""
    tensors = list(unwrapped.parameters()) + [b for b in unwrapped.buffers() if b.is_floating_point()]
    if hasattr(unwrapped, "teacher_state_dict"):  # the EMA teacher is not a registered submodule
        tensors += list(unwrapped.teacher_state_dict().values())
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # DTensor shards (FSDP2)
    finite = all(bool(torch.isfinite(t).all()) for t in tensors)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(torch.tensor([float(not finite)], device=accelerator.device), reduction="sum")
        finite = float(bad[0]) == 0
    return finite


LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` from its config / flag


BF16_MIN_SPEEDUP = 1.2  # auto takes bf16 on a CPU only when it is clearly faster: noise must not flip a choice


def native_bf16(cpu: bool) -> bool:
    """Does bf16 autocast pay here: a CUDA GPU with bf16; on a CPU, is it measured faster (cpu_bf16_speedup
    >= BF16_MIN_SPEEDUP), whatever the flags say: oneDNN runs bf16 fast with AMX, faster or not with
    AVX512-BF16, and emulates it 25-60x slower than fp32 on AVX2 (benchmarks/README.md). Under a launcher
    without its own precision (torchrun) every process must agree, and a measurement per process may not:
    there, AMX decides."""
    if not cpu:
        return torch.cuda.is_bf16_supported()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(tokens: int = 128, width: int = 384, repeats: int = 2) -> float:
    """fp32 time / bf16-autocast time of a transformer MLP's forward and backward (tokens x width ->
    4 width -> width, BERT-small sizes) on this CPU at the current thread count, best of `repeats`,
    the two precisions interleaved. Takes well under a second; once per process."""
    generator = torch.Generator().manual_seed(0)
    up = torch.randn(width, 4 * width, generator=generator, requires_grad=True)
    down = torch.randn(4 * width, width, generator=generator, requires_grad=True)
    x = torch.randn(tokens, width, generator=generator)

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (torch.nn.functional.gelu(x @ up) @ down).float().square().mean()
        loss.backward()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up: first calls pick kernels
    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):
        for bf16 in (False, True):
            best[bf16] = min(best[bf16], step(bf16))
    return best[False] / best[True]


def resolve_precision(chosen, cpu: bool, resumed_from: str | None = None):
    """train.mixed_precision as accelerate takes it: None leaves it to $ACCELERATE_MIXED_PRECISION
    (accelerate's own default "no" without a launcher); "auto" is the launcher's too, and without one
    the precision the resumed run trained in (`resumed_from`, from its newest checkpoint: a resume stays
    bit-exact whatever a new measurement says), else bf16 where native_bf16, else "no"; no/bf16/fp16 as given."""
    if chosen != "auto":
        return chosen
    if os.environ.get(LAUNCHER_PRECISION_ENV):
        return None
    if resumed_from:
        return resumed_from
    return "bf16" if native_bf16(cpu) else "no"


def auto_attention(recipe, accelerator):
    """train.mixed_precision auto on a CPU that runs bf16, with model.attn_implementation left null: the
    recipe with the eager attention kernel, which is faster there than SDPA (torch's CPU kernel is slow in
    bf16 at these head sizes; the figures are in benchmarks/README.md). Otherwise the recipe unchanged.
    attn_implementation is a run-time choice, not saved in the export's config.json."""
    if (recipe.objective == "jepa" and recipe.train.mixed_precision == "auto"
            and recipe.model.attn_implementation is None and accelerator.mixed_precision == "bf16"
            and accelerator.device.type == "cpu"):
        return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, attn_implementation="eager"))
    return recipe


def precision_conflict(recipe) -> str | None:
    """One line when the recipe's train.mixed_precision differs from the launcher's, else None. The
    recipe wins (an explicit setting is the more specific one); null and "auto" in the recipe take the
    launcher's, and without a launcher accelerate's default "no" (fp32) / native bf16 (resolve_precision)."""
    chosen, launched = recipe.train.mixed_precision, os.environ.get(LAUNCHER_PRECISION_ENV)
    if chosen in (None, "auto") or launched is None or launched.lower() == chosen:
        return None
    return (f"train.mixed_precision={chosen} overrides the launcher's mixed_precision={launched.lower()} "
            f"(the recipe wins; set it to null to use the launcher's)")


def _fsdp_over_gloo() -> None:
    """An FSDP launch config on CPU processes: accelerate (1.15) applies FSDP only to accelerator
    process groups and would silently run plain DDP over gloo instead. torch's FSDP2 shards over gloo
    too, so the CPU group is presented to accelerate as a multi-device one (as on GPUs, where
    PartialState says MULTI_GPU and AcceleratorState FSDP); this is how the FSDP code paths are
    tested without GPUs (recipes/accelerate/fsdp_cpu_2proc.yaml). FSDP2 only: FSDP1 wants a device."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise RuntimeError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 "
                           "shards on accelerators only)")
    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU  # the shared state: AcceleratorState copies it


def trained_precision(output_dir) -> str | None:
    """The precision the run in output_dir trained in, from its newest checkpoint whose trainer state reads
    (None: no checkpoint yet, or only ones written before checkpoints recorded it). A broken newer checkpoint
    is _resume_point's to report; here it is skipped."""
    for checkpoint in reversed(ckpt.list_checkpoints(output_dir)):
        try:
            return ckpt.read_trainer_state(checkpoint).mixed_precision or None
        except (OSError, ValueError, TypeError):
            continue
    return None


def make_accelerator(recipe, resume: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t = recipe.train
    trackers = [name for name in recipe.log.trackers if name != "jsonl"]
    # Without a GPU, cpu=True is what makes `accelerate launch --multi_gpu --num_processes N` give N
    # gloo processes (MULTI_CPU); with a GPU, `train.cpu: true` forces the CPU anyway.
    cpu = t.cpu or not torch.cuda.is_available()
    if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_over_gloo()
    resumed_from = trained_precision(t.output_dir) if resume and t.mixed_precision == "auto" else None
    return Accelerator(
        cpu=cpu,
        # None: $ACCELERATE_MIXED_PRECISION, else "no"
        mixed_precision=resolve_precision(t.mixed_precision, cpu, resumed_from),
        gradient_accumulation_steps=t.grad_accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=t.output_dir, logging_dir=str(Path(t.output_dir) / "logs")),
    )


def _allow_tf32(device, cleanup) -> None:
    """On CUDA, fp32 matmuls and convolutions (the fp32 parts under bf16 autocast, the fp32 EMA teacher,
    runs without autocast) use TF32 tensor cores; the previous flags come back when the run ends.
    On the CPU nothing changes."""
    if device.type != "cuda":
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def restore():
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

    cleanup.callback(restore)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


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


def _is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def _shared_effective_rank(accelerator, unwrapped, probe_ids: torch.Tensor) -> float:
    """probe_effective_rank on the main process, handed to every process. Under FSDP every process
    runs the probe (a sharded encoder's forward is collective; the JEPA teacher is a full copy, but the
    MLM encoder is sharded) and the main process's value is kept."""
    rank_value = torch.zeros(1, device=accelerator.device)
    if accelerator.is_main_process or _is_sharded(accelerator):
        value = probe_effective_rank(unwrapped, probe_ids, accelerator.device)
        if accelerator.is_main_process:
            rank_value += value
    return float(accelerator.reduce(rank_value, reduction="sum"))


def _set_fsdp_wrap_classes(accelerator, model) -> None:
    """FSDP with the transformer auto-wrap policy and no fsdp_transformer_layer_cls_to_wrap: one unit
    per class of the model's `_no_split_modules` (TextJepaLayer / RobertaLayer), leaving out the class
    that holds the input embedding (TextJepaEmbeddings / RobertaEmbeddings): accelerate (1.15) gives
    the input embedding its own unit after the policy's, and an embedding inside an already sharded
    module fails in fully_shard. A config that names the classes is used as it is."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if _is_sharded(accelerator) else None
    if plugin is None or plugin.transformer_cls_names_to_wrap is not None:
        return
    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy).__name__ != "transformer_auto_wrap_policy":
        return
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    holders = {type(m).__name__ for m in model.modules()
               if embedding is not None and any(sub is embedding for sub in m.modules())}
    plugin.transformer_cls_names_to_wrap = [name for name in (model._no_split_modules or []) if name not in holders]


def _update_teacher(accelerator, model, momentum: float) -> None:
    """EMA step of the teacher, on every process. The teacher is a full fp32 copy on each process
    (never prepared). FSDP2: update_teacher all-gathers the student's DTensor shards one parameter at
    a time. FSDP1 (not tested: it needs GPUs): inside summon_full_params the student is whole."""
    unwrapped = accelerator.unwrap_model(model)
    if _is_sharded(accelerator) and not getattr(accelerator, "is_fsdp2", False):
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
            except ckpt.ModelMismatch:  # the recipe changed, not the checkpoint: no older one fits either
                raise
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


def _prepare_output_dir(accelerator, recipe, resume: bool, say) -> Path:
    """Refuse a folder that holds checkpoints unless resuming (train.overwrite: clear it instead) and
    remove half-written saves. (The resolved recipe is written once the run's state is known: a resume that
    fails must not replace the recipe the checkpoints were trained with.)"""
    output_dir = Path(recipe.train.output_dir)
    existing = ckpt.list_checkpoints(output_dir)
    if existing and not resume:
        if not recipe.train.overwrite:
            raise FileExistsError(f"{output_dir} already holds {existing[-1].name}: pass --resume to continue it, "
                                  "or --set train.overwrite=true to delete it and start over, or pick another "
                                  "train.output_dir")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for path in existing + ckpt.list_diverged(output_dir) + [output_dir / "tokenizer", output_dir / "export"]:
                shutil.rmtree(path, ignore_errors=True)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.remove_stale_tmp(output_dir):
            say(f"removed half-written {stale.name} (interrupted save)")
        if recipe.model.init_from:  # what the export needs to write the checkpoint's architecture back
            from textjepa.conversion import read_start
            from textjepa.data import check_block_size

            start = read_start(recipe.model.init_from)
            check_block_size(recipe.data.block_size, start.textjepa_config().max_position_embeddings)
            start.save_template(output_dir / "source")
    accelerator.wait_for_everyone()
    return output_dir


def _start_state(accelerator, model, output_dir: Path, recipe, resume: bool, say) -> TrainerState:
    """The resumed TrainerState, or a fresh one (then the JEPA teacher starts as a copy of the student)."""
    state, latest = _resume_point(accelerator, model, output_dir, recipe) if resume else (None, None)
    diverged = [p for p in ckpt.list_diverged(output_dir)
                if latest is None or int(p.name.split("-")[1]) > int(latest.name.split("-")[1])]
    if latest is not None:
        say(f"resumed from {latest} at step {state.step}"
            + (f" (the last finite checkpoint; {diverged[-1].name}, saved when the run diverged, is kept for "
               "inspection and skipped)" if diverged else ""))
        return state
    if resume:
        say(f"--resume: no checkpoint to resume from in {output_dir}"
            + (f" ({diverged[-1].name} holds a diverged state and is skipped)" if diverged else "")
            + "; starting from scratch")
    if recipe.objective == "jepa":
        _update_teacher(accelerator, model, 0.0)  # teacher := the (broadcast) student
    return TrainerState(world_size=accelerator.num_processes, mixed_precision=accelerator.mixed_precision)


def _set_schedules(optimizer, step: int, recipe) -> tuple[float, float]:
    """Write this optimizer step's learning rate and weight decay into the param groups."""
    optim, max_steps = recipe.optim, recipe.train.max_steps
    lr = schedules.learning_rate(step, max_steps, optim.warmup_steps, optim.lr, optim.min_lr)
    weight_decay = schedules.weight_decay(step, max_steps, optim.weight_decay, optim.weight_decay_end)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group["apply_decay"] else 0.0
    return lr, weight_decay


def _optimizer_step(accelerator, model, optimizer, batches, recipe, step: int):
    """grad_accum micro-batches and one optimizer step. Returns (figures summed over the micro-batches
    by name: loss, and for JEPA target_std, prediction_std and the model's loss terms; grad norm)."""
    grad_accum, grad_clip = recipe.train.grad_accum, recipe.optim.grad_clip
    sums, grad_norm = {}, None
    for _ in range(grad_accum):
        # on CUDA the loader pins host memory (micro_batch_loader), so these copies run asynchronously
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
        with accelerator.accumulate(model):
            out = model(**batch)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                max_norm = grad_clip if grad_clip > 0 else float("inf")
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        fault_point("step", step)
        figures = {"loss": out.loss}
        if recipe.objective == "jepa":
            figures.update(target_std=out.target_std, prediction_std=out.prediction_std, **out.loss_terms)
            if out.pooled_reg_scale is not None:  # model.pooled_reg_drift_budget's scale on the guard
                figures["pooled_reg_scale"] = out.pooled_reg_scale
        for name, value in figures.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
    if not accelerator.sync_gradients:  # accumulate() must have synced on the last micro-batch
        raise RuntimeError(f"step {step}: gradients were not synchronised after {grad_accum} micro-batches")
    return sums, grad_norm


def _average_over_processes(accelerator, sums: dict, grad_accum: int, time_up: bool) -> tuple[dict, bool]:
    """One all-reduce per step: ({name: mean over micro-batches and processes}, whether any process
    ran out of time), the same on every process so that all take the same stop decisions."""
    names = sorted(sums)  # the same names on every process: the config decides them
    shared = torch.stack([sums[name] / grad_accum for name in names]
                         + [torch.tensor(float(time_up), device=accelerator.device)])
    shared = accelerator.reduce(shared, reduction="sum")
    world = accelerator.num_processes
    return {name: float(shared[i]) / world for i, name in enumerate(names)}, float(shared[-1]) > 0


class _MetricsRecorder:
    """Writes a step's figures to metrics.jsonl (main process), the trackers and the progress bar,
    with tokens/s over the window since the last record."""

    def __init__(self, accelerator, recipe, output_dir: Path, state: TrainerState):
        from tqdm.auto import tqdm

        self.accelerator, self.log = accelerator, recipe.log
        is_main = accelerator.is_main_process
        self.metrics_log = JsonlLog(output_dir / METRICS_FILE) if is_main and "jsonl" in self.log.trackers else None
        if self.metrics_log is not None:
            if state.step == 0:
                self.metrics_log.path.unlink(missing_ok=True)
            else:
                self.metrics_log.truncate_after(state.step)
        if any(name != "jsonl" for name in self.log.trackers):  # tensorboard, wandb, ... via accelerate
            accelerator.init_trackers("tensorboard", config=_flat_hparams(recipe))
        self.session_start = time.perf_counter()
        self.elapsed_before = state.elapsed_s
        self.window_start, self.window_tokens = self.session_start, 0
        self.history = []  # logged records of this session (main process)
        self.progress = tqdm(total=recipe.train.max_steps, initial=state.step,
                             disable=not (is_main and self.log.progress_bar),
                             desc=f"{recipe.objective} pretraining", dynamic_ncols=True)

    def session_seconds(self) -> float:
        return time.perf_counter() - self.session_start

    def elapsed(self) -> float:
        """Training wall time over all sessions."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def step_done(self, tokens: int) -> None:
        self.window_tokens += tokens
        self.progress.update(1)

    def record(self, metrics: dict, state: TrainerState, grad_norm) -> None:
        now = time.perf_counter()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        metrics["tokens_per_s"] = self.window_tokens / max(now - self.window_start, 1e-9)
        metrics["tokens_seen"] = state.tokens_seen
        metrics["elapsed_s"] = self.elapsed_before + now - self.session_start
        self.window_start, self.window_tokens = now, 0
        if self.metrics_log is not None:
            self.metrics_log.write(metrics)
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=state.step)
        self.history.append(metrics)
        state.last_metrics = metrics
        self.progress.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "target_std", "effective_rank")
                                   if metrics.get(k) is not None}, refresh=False)


def _start_accelerator(recipe, resume, announce, cleanup):
    """The Accelerator of this run (threads, TF32 on CUDA, the launcher's or the recipe's precision) and
    `say`, which prints on the main process only. -> (accelerator, say)"""
    die_with_launcher()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    accelerator = make_accelerator(recipe, resume)
    _allow_tf32(accelerator.device, cleanup)
    say = announce if accelerator.is_main_process else (lambda *a, **k: None)
    conflict = precision_conflict(recipe)
    if conflict:
        say(conflict)
    return accelerator, say


def _prepare_model(recipe, data, accelerator, model, cleanup, say):
    """Build (or take) the model (auto_attention picks its attention kernel) and its optimizer, make the
    JEPA's EMA teacher from the full student (before FSDP could shard it; the teacher stays outside
    prepare), then accelerate's prepare, then (train.compile) torch.compile of the unwrapped model's
    forward in place, undone by `cleanup`.
    -> (prepared model, prepared optimizer, unwrapped model)"""
    if model is None:
        model_recipe = auto_attention(recipe, accelerator)
        if model_recipe is not recipe:
            say("train.mixed_precision auto: bf16 autocast with eager attention (measured faster on this CPU)")
        model = build_model(model_recipe, data.tokenizer)
    model.to(accelerator.device)
    model.train()
    optimizer = build_optimizer(model, recipe, accelerator.device)
    if recipe.objective == "jepa":
        model.teacher  # the EMA teacher: a copy of the full student
    if _is_sharded(accelerator) and recipe.objective == "mlm":
        raise RuntimeError("objective mlm under FSDP is not supported: accelerate (1.15) puts RoBERTa's tied "
                           "lm_head bias into two FSDP2 groups; train the MLM baseline with DDP")
    _set_fsdp_wrap_classes(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    if recipe.train.compile:  # in place: the same module, state_dict keys unchanged (compiling.py)
        cleanup.callback(compile_forward(unwrapped, accelerator.device, _is_sharded(accelerator)))
    return model, optimizer, unwrapped


def _train(recipe, resume, model, announce, cleanup):
    from accelerate.utils import set_seed

    train_cfg, log_cfg = recipe.train, recipe.log
    accelerator, say = _start_accelerator(recipe, resume, announce, cleanup)
    _lock_output_dir(accelerator, Path(train_cfg.output_dir), cleanup)
    output_dir = _prepare_output_dir(accelerator, recipe, resume, say)
    set_seed(train_cfg.seed)  # same seed on every process: identical init (DDP broadcasts rank 0's anyway)

    setup_start = time.perf_counter()
    data = training_data(recipe, accelerator, output_dir)
    model, optimizer, unwrapped = _prepare_model(recipe, data, accelerator, model, cleanup, say)
    n_params = sum(p.numel() for p in unwrapped.parameters())
    state = _start_state(accelerator, model, output_dir, recipe, resume, say)
    if accelerator.is_main_process:
        recipe.save(output_dir / "recipe.yaml")  # the resolved recipe this run trains with
    recorder = _MetricsRecorder(accelerator, recipe, output_dir, state)
    say(f"textjepa {recipe.objective}: {n_params / 1e6:.2f} M trainable parameters, "
        f"{data.num_train_blocks or 'streamed'} train blocks of {recipe.data.block_size} tokens, "
        f"{train_cfg.max_steps} steps x {data.tokens_per_step} tokens "
        f"({accelerator.num_processes} process(es){', FSDP' if _is_sharded(accelerator) else ''}, {accelerator.device}, precision {accelerator.mixed_precision}); "
        f"setup {time.perf_counter() - setup_start:.1f}s")

    batches = iter(micro_batch_loader(data, recipe, state, accelerator.device))  # from the last step on
    guard_after = log_cfg.guard_after if log_cfg.guard_after is not None else recipe.optim.warmup_steps
    stop_after = train_cfg.stop_after if train_cfg.stop_after is not None else train_cfg.max_steps
    last_step = min(train_cfg.max_steps, stop_after)  # of this session
    stop_reason, end_reason = None, "max_steps"
    watch = CompileWatch() if train_cfg.compile else None
    while state.step < last_step:
        step = state.step  # optimizer step about to run (0-based)
        lr, weight_decay = _set_schedules(optimizer, step, recipe)
        with compile_errors(train_cfg.compile, step):
            sums, grad_norm = _optimizer_step(accelerator, model, optimizer, batches, recipe, step)
        momentum = _ema_step(accelerator, model, recipe, step, state)
        state.step += 1
        state.tokens_seen += data.tokens_per_step
        recorder.step_done(data.tokens_per_step)
        if watch is not None:
            watch.step_done(state.step)

        time_up = train_cfg.max_minutes is not None and recorder.session_seconds() > 60 * train_cfg.max_minutes
        averages, time_up = _average_over_processes(accelerator, sums, train_cfg.grad_accum, time_up)
        metrics = {"step": state.step, "lr": lr, "weight_decay": weight_decay, **averages}
        if recipe.objective == "jepa":
            metrics["momentum"] = momentum
        session_ends = time_up or state.step >= last_step  # log final figures
        is_diag_step = state.step % log_cfg.diag_every == 0 or session_ends
        if is_diag_step:
            metrics["effective_rank"] = _shared_effective_rank(accelerator, unwrapped, data.probe_ids)
        if is_diag_step or state.step % log_cfg.every == 0 or state.step == 1 or session_ends:
            recorder.record(metrics, state, grad_norm)

        # Collapse is a JEPA failure; MLM's mean-pooled states are anisotropic (low rank) by nature,
        # so for MLM only the NaN/Inf guard applies.
        stop_reason = check_guards(state.step, metrics,
                                   guard_active=recipe.objective == "jepa" and state.step > guard_after,
                                   min_std=log_cfg.min_std, min_rank=log_cfg.min_rank)
        is_save_step = state.step % train_cfg.save_every == 0 and state.step < train_cfg.max_steps
        if not stop_reason and (is_save_step or session_ends) and not _weights_finite(accelerator, unwrapped):
            # a finite loss computed before the update does not prove the updated weights finite
            stop_reason = f"step {state.step}: the weights hold NaN/Inf after the optimizer step; stopping"
        if stop_reason:
            state.last_metrics = metrics
            break
        if is_save_step:
            state.elapsed_s = recorder.elapsed()
            save_checkpoint(accelerator, model, output_dir, state, recipe, data.tokenizer)
        if time_up:
            end_reason = f"train.max_minutes={train_cfg.max_minutes} reached"
            break
    else:
        if state.step < train_cfg.max_steps:
            end_reason = f"train.stop_after={train_cfg.stop_after} reached"
    recorder.progress.close()
    if watch is not None:
        say(watch.line())

    state.elapsed_s = recorder.elapsed()
    last_checkpoint = _save_last(accelerator, model, output_dir, state, recipe, data.tokenizer, stop_reason, say)
    summary = {"objective": recipe.objective, "steps": state.step, "max_steps": train_cfg.max_steps,
               "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed_s, "end_reason": end_reason,
               "checkpoint": str(last_checkpoint), "parameters": n_params, "mixed_precision": accelerator.mixed_precision,
               "final_metrics": state.last_metrics,
               "first_metrics": recorder.history[0] if recorder.history else None,
               "tokens_per_s_mean": _mean_throughput(recorder.history)}
    if watch is not None:
        summary["compile"] = watch.summary()
    if accelerator.is_main_process:
        # under FSDP the student is sharded over the processes: export from the checkpoint just saved,
        # which holds the full student (model.safetensors) and the teacher
        exported = _checkpoint_model(last_checkpoint) if _is_sharded(accelerator) and train_cfg.export else unwrapped
        _finish_run(exported, recipe, data.tokenizer, state, output_dir, recorder.metrics_log, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _ema_step(accelerator, model, recipe, step, state):
    """The teacher's EMA update after optimizer step `step` (JEPA only) -> the momentum used, or None
    (MLM, or ema.schedule frozen)."""
    if recipe.objective != "jepa":
        return None
    momentum = schedules.ema_momentum(step, recipe.train.max_steps, recipe.ema.momentum_start,
                                      recipe.ema.momentum_end, recipe.ema.schedule)
    if momentum is not None:
        _update_teacher(accelerator, model, momentum)
        state.ema_updates += 1
    return momentum


def _save_last(accelerator, model, output_dir: Path, state: TrainerState, recipe, tokenizer, stop_reason, say) -> Path:
    """The session's last checkpoint; when a guard stopped the run, raise TrainingStopped after it
    (a NaN/Inf state goes to checkpoint-<step>-diverged)."""
    unwrapped = accelerator.unwrap_model(model)
    diverged_stop = bool(stop_reason) and (not math.isfinite(state.last_metrics.get("loss", 0.0))
                                           or not _weights_finite(accelerator, unwrapped))
    last_checkpoint = save_checkpoint(accelerator, model, output_dir, state, recipe, tokenizer, diverged=diverged_stop)
    if stop_reason:
        if diverged_stop:
            finite = ckpt.latest_checkpoint(output_dir)
            stop_reason += (f"; the last finite checkpoint is {finite.name} (--resume restarts from it)" if finite
                            else "; there is no finite checkpoint yet (--resume starts from scratch)")
        say(f"STOPPED: {stop_reason}\n  state saved in {last_checkpoint}")
        accelerator.end_training()
        raise TrainingStopped(stop_reason, last_checkpoint)
    return last_checkpoint


def _checkpoint_model(checkpoint: Path):
    from .export import load_checkpoint_model

    return load_checkpoint_model(checkpoint)[1]


def _finish_run(unwrapped, recipe, tokenizer, state, output_dir: Path, metrics_log, summary: dict) -> None:
    """Main process, after the last checkpoint: export (+ shipped whitening), curves, summary.json."""
    train_cfg = recipe.train
    if train_cfg.export:
        from .export import export_model

        export_dir = output_dir / "export"
        export_model(unwrapped, recipe, tokenizer, export_dir, which=train_cfg.export_which, trainer_state=state,
                     source_template=output_dir / "source" if recipe.model.init_from else None)
        summary["export"] = str(export_dir)
        if train_cfg.export_whiten_on:  # post-processing shipped inside the export (SentenceEncoder applies it)
            from textjepa.embedding.encoder import ship_whitening

            from .batches import text_source

            source = text_source(train_cfg.export_whiten_on, output_dir)
            summary["whitening"] = ship_whitening(export_dir, source, train_cfg.export_whiten_docs,
                                                  train_cfg.export_token_weights)
    if recipe.log.plot and metrics_log is not None:
        from .plots import plot_training_curves

        png = plot_training_curves(metrics_log.path, output_dir / "training_curves.png",
                                   title=f"{recipe.objective} - {train_cfg.output_dir}")
        summary["plot"] = str(png) if png else None
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True))




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
        terms = [f"{name} {fmt(final[name])}" for name in LOSS_TERM_NAMES if final.get(name) is not None]
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
