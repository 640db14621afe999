"""Process-level safety for a training run: one run per output_dir (an advisory lock held by the main
process), ranks that end with their launcher, and the named kill points the fault-injection tests use.

The lock is `fcntl.flock` on `<output_dir>/.textjepa.lock`: the kernel releases it when the holder
exits, however it exits (kill -9 included), so a stale lock never blocks a `--resume`.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

LOCK_FILE = ".textjepa.lock"
FAULT_ENV = "TEXTJEPA_FAULT"  # "<point>:<step>": SIGKILL this process there (tests only)


class RunLocked(RuntimeError):
    """Another live process holds the output_dir's lock."""


class RunLock:
    """An exclusive advisory lock on an output directory (Linux/macOS; a no-op where fcntl is missing)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; runs are not protected from each other
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{self.path.parent}: another textjepa run (pid {holder}) is using this "
                            f"train.output_dir (lock {self.path}); wait for it to end or pick another "
                            "train.output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def die_with_launcher() -> None:
    """Under a launcher (accelerate launch / torchrun set LOCAL_RANK), ask the kernel to SIGKILL this
    rank when its parent dies, so that killing the launcher never leaves ranks training and writing.
    Checkpoints are atomic, so a kill at any moment loses at most the steps since the last save."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process at the named point when TEXTJEPA_FAULT="<name>:<step>" (fault-injection tests:
    step, save, prune, export)."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted and wanted == f"{name}:{step}":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
