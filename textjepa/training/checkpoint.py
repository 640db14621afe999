"""Atomic checkpoint directories: everything is written into `.tmp-checkpoint-<step>`, flushed to disk
(fsync of every file and of the directory) and only then renamed to `checkpoint-<step>`. A rename
within one filesystem is atomic, so a crash during a save leaves the previous checkpoints as they
were and at worst a `.tmp-*` folder, which is never mistaken for a checkpoint and is removed on the
next start.

Only `checkpoint-<step>` folders count: `checkpoint-<step>-diverged` (the state of a run stopped by
the NaN guard, kept for inspection) and `checkpoint-<step>-corrupt` (a checkpoint that failed
verification on resume, set aside) are never resumed from, exported by a run directory, or pruned."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
TMP_PREFIXES = (TMP_PREFIX, ".tmp-export-")  # half-written folders removed at the next start
DIVERGED_SUFFIX = "-diverged"
CORRUPT_SUFFIX = "-corrupt"
COMPLETE_MARKER = "trainer_state.json"  # written last inside the tmp dir
_NAME = re.compile(r"^checkpoint-(\d+)$")


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
