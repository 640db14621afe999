"""Atomic checkpoint directories: everything is written into `.tmp-checkpoint-<step>`, flushed to disk
(fsync of every file and of the directory) and only then renamed to `checkpoint-<step>`. A rename
within one filesystem is atomic, so a crash during a save leaves the previous checkpoints as they
were and at worst a `.tmp-*` folder, which is never mistaken for a checkpoint and is removed on the
next start.

Only `checkpoint-<step>` folders count: `checkpoint-<step>-diverged` (the state of a run stopped by
the NaN guard, kept for inspection) and `checkpoint-<step>-corrupt` (a checkpoint that failed
verification on resume, set aside) are never resumed from, exported by a run directory, or pruned.

Also here: what a checkpoint holds (TrainerState, the EMA teacher's file) and how the loop saves
and loads one (save_checkpoint / load_checkpoint), so that loop.py and export.py both import from
this module and never from each other."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .process import fault_point

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
TMP_PREFIXES = (TMP_PREFIX, ".tmp-export-")  # half-written folders removed at the next start
DIVERGED_SUFFIX = "-diverged"
CORRUPT_SUFFIX = "-corrupt"
COMPLETE_MARKER = "trainer_state.json"  # the TrainerState, written last inside the tmp dir
TEACHER_FILE = "teacher.safetensors"  # the EMA teacher (JEPA), not part of accelerate's state
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no checkpoint could be loaded; the message names the path."""


class ModelMismatch(CheckpointError):
    """--resume with a recipe whose model does not fit the checkpoint (its shape changed); the message names
    the recipe keys that differ from the checkpoint's. Not the checkpoint's fault: no older one would fit."""


@dataclass
class TrainerState:
    """Bookkeeping saved as trainer_state.json in every checkpoint (written last: the 'complete' mark)."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # over all processes
    ema_updates: int = 0
    elapsed_s: float = 0.0  # training wall time over all sessions
    world_size: int = 1
    mixed_precision: str = ""  # what accelerate ran ("no", "bf16", "fp16"): an `auto` resume keeps it
    last_metrics: dict = field(default_factory=dict)
    # data.streaming: the epoch the next step reads and the step that epoch began at (a resumed stream
    # re-reads that epoch and skips step - stream_epoch_start optimizer steps of blocks)
    stream_epoch: int = 0
    stream_epoch_start: int = 0


def read_trainer_state(checkpoint_dir: Path) -> TrainerState:
    """The checkpoint's TrainerState (keys this version does not know are dropped)."""
    saved = json.loads((Path(checkpoint_dir) / COMPLETE_MARKER).read_text())
    return TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})


def write_trainer_state(directory: Path, state: TrainerState) -> None:
    path = directory / COMPLETE_MARKER
    with open(path, "w") as f:
        json.dump(state.__dict__, f, indent=2, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def tmp_checkpoint_dir(output_dir: str | Path, step: int, suffix: str = "") -> Path:
    # Deterministic name (no pid) so that every process of a distributed run writes into the same one.
    return Path(output_dir) / f"{TMP_PREFIX}{step:08d}{suffix}"


def list_diverged(output_dir: str | Path) -> list[Path]:
    """`checkpoint-<step>-diverged` folders (NaN stops), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.glob(f"{PREFIX}*{DIVERGED_SUFFIX}") if p.is_dir())


def verify_checkpoint(path: Path, teacher_file: str | None = None) -> str | None:
    """None when the checkpoint's files are whole, else one line naming the first bad file. Catches
    truncation (safetensors headers cover the file, torch files are zip archives with a directory at
    the end) and unreadable trainer_state.json; not bit flips inside tensor data."""
    from safetensors import safe_open

    state_file = path / COMPLETE_MARKER
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{state_file}: expected a JSON object with an integer 'step'"
    except (OSError, ValueError) as err:
        return f"{state_file}: unreadable ({err})"
    # accelerate writes model.safetensors + optimizer.bin (DDP, one process); FSDP writes
    # pytorch_model_fsdp_* / optimizer_* folders instead, which are only checked for presence
    if not (path / "model.safetensors").is_file() and not list(path.glob("pytorch_model*")):
        return f"{path / 'model.safetensors'}: missing"
    for name in ["model.safetensors"] + ([teacher_file] if teacher_file else []):
        file = path / name
        if name == "model.safetensors" and not file.is_file():
            continue
        if not file.is_file():
            return f"{file}: missing"
        try:
            with safe_open(str(file), "pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError: truncated or not a safetensors file
            return f"{file}: corrupt or truncated ({err})"
    if not list(path.glob("optimizer*")):
        return f"{path / 'optimizer.bin'}: missing"
    for file in sorted(path.glob("optimizer*.bin")):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"{file}: corrupt (bad CRC in {bad})"
        except (OSError, zipfile.BadZipFile) as err:
            return f"{file}: corrupt or truncated ({err})"
    return None


def set_aside(path: Path, suffix: str) -> Path:
    """Rename a checkpoint out of the resumable set (kept for inspection, never deleted)."""
    target = path.with_name(path.name + suffix)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}{n}")
    os.replace(path, target)
    return target


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open directories; the files were synced already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def replace_directory(tmp_dir: Path, output_dir: Path) -> Path:
    """Put the complete folder `tmp_dir` at `output_dir` by renames only, so a reader finds the old folder or the
    new one, never a mix. os.replace cannot replace a non-empty directory: an old one is moved aside first, then
    deleted."""
    tmp_dir, output_dir = Path(tmp_dir), Path(output_dir)
    if output_dir.exists():
        old = output_dir.parent / f".tmp-old-{output_dir.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output_dir, old)
        os.replace(tmp_dir, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, output_dir)
    return output_dir


def commit_checkpoint(tmp_dir: Path, final_dir: Path) -> Path:
    """fsync `tmp_dir` then atomically rename it to `final_dir` (main process only)."""
    if not (tmp_dir / COMPLETE_MARKER).is_file():
        raise RuntimeError(f"{tmp_dir}: refusing to commit a checkpoint without {COMPLETE_MARKER}")
    fsync_tree(tmp_dir)
    if final_dir.exists():
        # Same step saved twice (periodic save, then the end or guard save): the state has not moved
        # since, so the complete copy already there stays and the new one is dropped.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return final_dir
    os.replace(tmp_dir, final_dir)
    _fsync_path(final_dir.parent)
    return final_dir


def remove_stale_tmp(output_dir: str | Path) -> list[Path]:
    """Remove half-written `.tmp-checkpoint-*` / `.tmp-export-*` folders left by a crash (main process, at start)."""
    removed = []
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.name.startswith(TMP_PREFIXES):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was deleted."""
    found = list_checkpoints(output_dir)
    doomed = found[:-keep_last] if keep_last > 0 else found
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------- saving and loading a run's state

def _describe_write_error(err: Exception, path: Path) -> str:
    """One line for a failed write; a full disk says so whatever the library's wording
    (torch.save: 'basic_ios::clear: iostream error', safetensors: 'os error 28')."""
    text = str(err)
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in text or "os error 28" in text
    if not full:
        try:
            full = shutil.disk_usage(path if path.exists() else path.parent).free < (1 << 20)
        except OSError:
            pass
    if full:
        return f"{path}: No space left on device while writing the checkpoint; free space and run again with --resume"
    return f"{path}: writing the checkpoint failed: {type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _full_model_state(accelerator, model) -> dict | None:
    """Under FSDP the whole (unsharded) model state on the main process's CPU ({} elsewhere), so that
    every checkpoint also holds a plain model.safetensors: `textjepa export` and the end-of-run export
    read it (resume reads accelerate's sharded files). None when not sharded (accelerate wrote it)."""
    if accelerator.distributed_type.name != "FSDP":
        return None
    return accelerator.get_state_dict(model)


def _without_shared(state_dict: dict) -> dict:
    """Tensors contiguous on the CPU, each storage once (safetensors refuses tied copies, e.g. the MLM
    decoder weight; the export re-ties them)."""
    seen, kept = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        kept[name] = tensor.detach().cpu().contiguous()
    return kept


def save_checkpoint(accelerator, model, output_dir: Path, state: TrainerState, recipe, tokenizer,
                    diverged: bool = False) -> Path:
    """All processes call this. Written into a tmp dir, committed by an atomic rename (module doc).
    diverged: the state holds NaN/Inf (the NaN guard fired); it goes to checkpoint-<step>-diverged, apart
    from the resumable checkpoints, and nothing is pruned."""
    from safetensors.torch import save_file

    suffix = DIVERGED_SUFFIX if diverged else ""
    tmp_dir = tmp_checkpoint_dir(output_dir, state.step, suffix)
    final_dir = output_dir / (checkpoint_name(state.step) + suffix)
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # model.safetensors (student + predictor / MLM), optimizer.bin, random_states_<rank>.pkl, ...
        # (FSDP: pytorch_model_fsdp_0/ and optimizer_0/ in the config's state dict type instead)
        accelerator.save_state(str(tmp_dir))
        full_model = _full_model_state(accelerator, model)  # FSDP: collective, every process
        fault_point("save", state.step)
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            if full_model is not None:
                save_file(_without_shared(full_model), str(tmp_dir / "model.safetensors"))
            if recipe.objective == "jepa":
                teacher = {k: v.detach().cpu().contiguous() for k, v in unwrapped.teacher_state_dict().items()}
                save_file(teacher, str(tmp_dir / TEACHER_FILE))
            unwrapped.config.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(str(tmp_dir / "tokenizer"))
            if (output_dir / "source").is_dir():  # model.init_from: the checkpoint's template (conversion.py)
                shutil.copytree(output_dir / "source", tmp_dir / "source")
            recipe.save(tmp_dir / "recipe.yaml")
            write_trainer_state(tmp_dir, state)
    except Exception as err:
        message = _describe_write_error(err, tmp_dir)  # before freeing the space the torn save took
        if accelerator.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise CheckpointError(message) from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_checkpoint(tmp_dir, final_dir)
        fault_point("prune", state.step)
        if not diverged:
            prune_checkpoints(output_dir, recipe.train.keep_last)
    accelerator.wait_for_everyone()
    return final_dir


def _check_random_states(checkpoint_dir: Path, process_index: int) -> None:
    """accelerate skips a missing/unreadable RNG file with an INFO line; say it out loud."""
    import torch

    path = checkpoint_dir / f"random_states_{process_index}.pkl"
    if not path.is_file():
        problem = "is missing"
    else:
        try:
            states = torch.load(path, weights_only=False)
            problem = None if isinstance(states, dict) and "torch_manual_seed" in states else "holds no RNG states"
        except Exception as err:
            problem = f"is unreadable ({type(err).__name__})"
    if problem:
        logger.warning("%s %s: the random number streams (dropout) restart from the seed, so this resume is "
                       "no longer bit-exact", path, problem)


# The recipe keys that size the model ("model": all model.* keys): when the model does not fit its checkpoint,
# those that differ from the checkpoint's recipe.yaml are named.
MODEL_SHAPE_KEYS = ("objective", "model", "data.block_size", "data.vocab_size", "data.tokenizer",
                    "data.tokenizer_model")


def _dotted(sections: dict) -> dict:
    """{"objective": "jepa", "model": {"hidden_size": 32}} -> {"objective": "jepa", "model.hidden_size": 32}"""
    flat = {}
    for name, value in sections.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            flat[name] = value
    return flat


def changed_model_keys(checkpoint_dir: Path, recipe) -> list[tuple[str, object, object]]:
    """(dotted key, checkpoint's value, recipe's value) for each MODEL_SHAPE_KEYS key where the checkpoint's
    recipe.yaml differs from `recipe`; [] when that file is missing or unreadable."""
    import yaml

    try:
        saved = yaml.safe_load((Path(checkpoint_dir) / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    saved = _dotted(saved) if isinstance(saved, dict) else {}
    return [(key, saved[key], value) for key, value in _dotted(recipe.to_dict()).items()
            if (key in MODEL_SHAPE_KEYS or key.split(".")[0] in MODEL_SHAPE_KEYS) and key in saved
            and saved[key] != value]


def _yaml_text(value) -> str:
    return "null" if value is None else str(value)  # as --set reads it back


def _model_mismatch(checkpoint_dir: Path, recipe, err: RuntimeError) -> ModelMismatch:
    """One line for a state_dict that does not fit the model: the recipe keys that changed and both values,
    else torch's first detail (which parameter, both shapes)."""
    changed = [(key, _yaml_text(old), _yaml_text(new)) for key, old, new in changed_model_keys(checkpoint_dir, recipe)]
    if changed:
        what = "; ".join(f"{key} is {new} in the recipe but {old} in the checkpoint" for key, old, new in changed)
        back = " ".join(f"--set {key}={old}" for key, old, _ in changed)
        return ModelMismatch(f"{checkpoint_dir}: the recipe's model does not fit this checkpoint: {what}; to resume, "
                             f"use the checkpoint's values ({back}) or another train.output_dir; the checkpoint is "
                             "untouched")
    details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    return ModelMismatch(f"{checkpoint_dir}: the recipe's model does not fit this checkpoint "
                         f"({details[0] if details else str(err)}); the checkpoint is untouched")


def load_checkpoint(accelerator, model, checkpoint_dir: Path, recipe) -> TrainerState:
    """Load the checkpoint into `model` (and the optimizer, RNG states, teacher); ModelMismatch when the
    recipe's model does not fit it (nothing on disk is changed)."""
    from safetensors.torch import load_file

    _check_random_states(checkpoint_dir, accelerator.process_index)
    try:
        accelerator.load_state(str(checkpoint_dir))  # model, optimizer, RNG states of this process
    except RuntimeError as err:
        if "Error(s) in loading state_dict" not in str(err):  # torch's (and safetensors') words for a misfit
            raise
        raise _model_mismatch(checkpoint_dir, recipe, err) from err
    if recipe.objective == "jepa":
        # load on the CPU: load_state_dict copies onto the teacher's device ("cpu:0" is no safetensors device)
        teacher = load_file(str(checkpoint_dir / TEACHER_FILE))
        accelerator.unwrap_model(model).load_teacher_state_dict(teacher)
    state = read_trainer_state(checkpoint_dir)
    if state.world_size != accelerator.num_processes:
        logger.warning("%s was saved by %d processes, resuming with %d: the data order and RNG streams "
                       "change, resume is no longer exact", checkpoint_dir, state.world_size,
                       accelerator.num_processes)
    state.world_size = accelerator.num_processes
    if state.mixed_precision and state.mixed_precision != accelerator.mixed_precision:
        logger.warning("%s was trained in precision %s, resuming in %s: resume is no longer exact",
                       checkpoint_dir, state.mixed_precision, accelerator.mixed_precision)
    state.mixed_precision = accelerator.mixed_precision
    return state
