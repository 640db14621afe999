"""Fault injection on real training runs: SIGKILL at named points (mid-step, mid-save, between save and
prune, mid-export), a NaN stop, a torn metrics.jsonl, a full disk, a locked output_dir, corrupt or
incomplete checkpoints, a killed `accelerate launch`, and 2-process resume. After each fault `--resume`
must continue from the last complete (and finite) checkpoint, lose at most save_every steps and end
bit-identical (losses and weights) to a run that was never interrupted.

Kills use the TEXTJEPA_FAULT="<point>:<step>" hook (textjepa/training/process.py): the training
subprocess SIGKILLs itself there, exactly as `kill -9` would, at a reproducible moment."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import losses, quiet, teacher_state, tiny_data, tiny_recipe  # noqa: F401 (fixture)

from textjepa.training import checkpoint as ckpt
from textjepa.training import loop
from textjepa.training.process import RunLock

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_EVERY = 8, 3  # checkpoints at 3, 6 and 8 (the end)
RUN = {"train.max_steps": MAX_STEPS, "train.save_every": SAVE_EVERY, "train.keep_last": 1, "train.export": True}

pytestmark = pytest.mark.slow


def env(**extra):
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", **extra}


def train_cli(recipe_file, *args, timeout=180, **extra_env):
    """`python -m textjepa.train` in a subprocess (this worktree's code)."""
    cmd = [sys.executable, "-m", "textjepa.train", "--recipe", str(recipe_file), *args]
    return subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def write_recipe(tiny_data, tmp_path, out, **overrides):
    recipe = tiny_recipe(tiny_data, out, **{**RUN, **overrides})
    path = tmp_path / f"{Path(out).name}.yaml"
    recipe.save(path)
    return recipe, path


def assert_same_run(out, reference):
    """Every logged loss, the final teacher and the export equal the uninterrupted run's, bit for bit."""
    assert losses(out) == losses(reference)
    assert sorted(losses(out)) == list(range(1, MAX_STEPS + 1))  # continued, not duplicated
    final = ckpt.checkpoint_name(MAX_STEPS)
    a, b = teacher_state(out / final), teacher_state(reference / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(str(out / "export" / "model.safetensors")), load_file(str(reference / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert f"{MAX_STEPS} optimizer steps" in (out / "export" / "README.md").read_text()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted run every faulted run must end up identical to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    loop.train(tiny_recipe(tiny_data, out, **RUN), announce=quiet)
    return out


# point, step: where the subprocess kills itself; resumed_from: the checkpoint --resume must pick
KILLS = [
    ("step", 4, 3),     # inside optimizer step 5 (0-based 4): steps 4..5 are redone
    ("save", 6, 3),     # checkpoint-6 half written (.tmp-checkpoint-*): back to 3
    ("prune", 6, 6),    # checkpoint-6 committed, checkpoint-3 not pruned yet: 6
    ("export", 8, 8),   # the end-of-run export half written in .tmp-export-*: checkpoint-8, export again
]


@pytest.mark.parametrize("point, step, resumed_from", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_then_resume_is_exact(tiny_data, tmp_path, reference, point, step, resumed_from):
    out = tmp_path / "run"
    recipe, recipe_file = write_recipe(tiny_data, tmp_path, out)
    killed = train_cli(recipe_file, TEXTJEPA_FAULT=f"{point}:{step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert ckpt.latest_checkpoint(out).name == ckpt.checkpoint_name(resumed_from)
    if point == "prune":
        assert len(ckpt.list_checkpoints(out)) == 2  # keep_last=1 not applied yet: both are complete
    if point == "export":
        assert not (out / "export").exists() and list(out.glob(".tmp-export-*"))
    lost = step + (point == "step") - resumed_from
    assert 0 <= lost <= SAVE_EVERY
    said = []
    loop.train(recipe, resume=True, announce=said.append)
    assert any(f"resumed from {out / ckpt.checkpoint_name(resumed_from)}" in s for s in said), said
    assert not list(out.glob(".tmp-*"))  # half-written folders removed
    assert [p.name for p in ckpt.list_checkpoints(out)] == [ckpt.checkpoint_name(MAX_STEPS)]
    assert_same_run(out, reference)


def nan_after(step_to_break):
    """Patch the model's forward so that the loss is NaN from optimizer step `step_to_break` (1-based) on."""
    from textjepa import TextJepaForPreTraining

    real_forward = TextJepaForPreTraining.forward
    calls = []

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= step_to_break:
            out.loss = out.loss * float("nan")
        return out

    return forward


def test_nan_stop_keeps_last_finite_checkpoint_and_resume_uses_it(tiny_data, tmp_path, reference, monkeypatch,
                                                                   capsys):
    from textjepa import TextJepaForPreTraining
    from textjepa.cli import main as cli_main

    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, out, **RUN)
    monkeypatch.setattr(TextJepaForPreTraining, "forward", nan_after(5))
    with pytest.raises(loop.TrainingStopped, match="step 5: loss is nan") as err:
        loop.train(recipe, announce=quiet)
    diverged = out / (ckpt.checkpoint_name(5) + ckpt.DIVERGED_SUFFIX)
    assert err.value.checkpoint == diverged and "last finite checkpoint is checkpoint-00000003" in str(err.value)
    assert not all(torch.isfinite(t).all() for t in teacher_state(diverged).values())  # the NaN state, kept
    # keep_last=1: the diverged state neither counts nor pushes the finite checkpoint out
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-00000003"]
    # export: the run directory means its last finite checkpoint; the diverged one is refused by name
    assert cli_main(["export", "--checkpoint", str(diverged), "--output", str(tmp_path / "nan-export")]) != 0
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and str(diverged) in message and "NaN/Inf" in message
    assert not (tmp_path / "nan-export").exists()
    assert cli_main(["export", "--checkpoint", str(out), "--output", str(tmp_path / "finite-export")]) == 0
    assert "exported the encoder of " + str(out / "checkpoint-00000003") in capsys.readouterr().out
    monkeypatch.undo()
    said = []
    loop.train(recipe, resume=True, announce=said.append)
    assert any("resumed from" in s and "checkpoint-00000003 at step 3 (the last finite checkpoint; "
               "checkpoint-00000005-diverged" in s for s in said), said
    assert diverged.is_dir()  # kept for inspection
    assert_same_run(out, reference)


def test_torn_metrics_line_is_dropped_on_resume(tiny_data, tmp_path, reference, caplog):
    out = tmp_path / "run"
    loop.train(tiny_recipe(tiny_data, out, **RUN, **{"train.stop_after": 6}), announce=quiet)
    with open(out / loop.METRICS_FILE, "a") as f:
        f.write('{"step": 7, "loss": 0.4')  # a full disk or a kill mid-write
    caplog.set_level(logging.WARNING)
    loop.train(tiny_recipe(tiny_data, out, **RUN), resume=True, announce=quiet)
    assert any("metrics.jsonl:" in r.getMessage() and "torn" in r.getMessage() for r in caplog.records)
    assert_same_run(out, reference)


CORRUPTIONS = {
    "model.safetensors": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "teacher.safetensors": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "optimizer.bin": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "trainer_state.json": lambda p: p.write_text('{"step": 6, "tokens_seen": '),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back(tiny_data, tmp_path, reference, caplog, name):
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, out, **{**RUN, "train.keep_last": 2})
    loop.train(tiny_recipe(tiny_data, out, **{**RUN, "train.keep_last": 2, "train.stop_after": 6}), announce=quiet)
    CORRUPTIONS[name](out / "checkpoint-00000006" / name)
    caplog.set_level(logging.WARNING)
    said = []
    loop.train(recipe, resume=True, announce=said.append)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"checkpoint-00000006/{name}" in w and "falling back" in w for w in warnings), warnings
    assert any("resumed from" in s and "checkpoint-00000003" in s for s in said), said
    assert (out / "checkpoint-00000006-corrupt" / name).is_file()  # set aside, not deleted
    assert_same_run(out, reference)


def test_missing_random_states_warns_by_name(tiny_data, tmp_path, caplog):
    out = tmp_path / "run"
    loop.train(tiny_recipe(tiny_data, out, **{"train.max_steps": 4, "train.stop_after": 2}), announce=quiet)
    (out / "checkpoint-00000002" / "random_states_0.pkl").unlink()
    caplog.set_level(logging.WARNING)
    loop.train(tiny_recipe(tiny_data, out, **{"train.max_steps": 4}), resume=True, announce=quiet)
    assert any("random_states_0.pkl is missing" in r.getMessage() and "no longer bit-exact" in r.getMessage()
               for r in caplog.records)


def test_second_run_on_locked_dir_fails_at_once_naming_the_holder(tiny_data, tmp_path):
    out = tmp_path / "run"
    _, recipe_file = write_recipe(tiny_data, tmp_path, out)
    out.mkdir()
    in_flight = ckpt.tmp_checkpoint_dir(out, 3)  # the first run's save in progress
    in_flight.mkdir()
    lock = RunLock(out).acquire()  # this process plays the first run
    try:
        second = train_cli(recipe_file, "--resume")
    finally:
        lock.release()
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert "Traceback" not in second.stderr and f"pid {os.getpid()}" in lines[-1] and str(out) in lines[-1]
    assert in_flight.is_dir()  # untouched


FULL_DISK = r"""set -e
mount -t tmpfs -o size=$SIZE tmpfs "$OUT"
exec "$@"
"""


def test_full_disk_during_save_names_the_path(tiny_data, tmp_path, monkeypatch):
    """A real full disk (a 120 KiB tmpfs in a user+mount namespace) where the namespace is allowed;
    elsewhere the same error raised by the save itself."""
    out = tmp_path / "run"
    out.mkdir()
    recipe, recipe_file = write_recipe(tiny_data, tmp_path, out, **{"train.export": False, "train.max_steps": 4})
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", FULL_DISK, "sh",
           sys.executable, "-m", "textjepa.train", "--recipe", str(recipe_file)]
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True) \
        if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        result = subprocess.run(cmd, env=env(OUT=str(out), SIZE="120k"), capture_output=True, text=True, timeout=180)
        assert result.returncode != 0
        message = result.stderr.strip().splitlines()[-1]
    else:
        import errno

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr("accelerate.Accelerator.save_state", full)
        with pytest.raises(loop.CheckpointError) as err:
            loop.train(recipe, announce=quiet)
        message = str(err.value)
    assert "No space left on device" in message and ".tmp-checkpoint-" in message and "Traceback" not in message


# -------------------------------------------------------------------------- 2 processes (accelerate launch)

def launch(recipe_file, *args, extra_env=None, **popen):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(port),
           "-m", "textjepa.train", "--recipe", str(recipe_file), *args]
    return subprocess.Popen(cmd, env=env(**(extra_env or {})), **popen)


def test_two_process_resume_is_bit_exact(tiny_data, tmp_path):
    full = tmp_path / "full"
    _, full_file = write_recipe(tiny_data, tmp_path, full, **{"train.batch_size": 4, "train.keep_last": 3,
                                                               "train.export": False, "train.max_steps": 6})
    proc = launch(full_file, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output[-3000:]
    # the interrupted run: what a kill after step 3 leaves (checkpoint-3 and the log up to it, one torn line)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-00000003", part / "checkpoint-00000003")
    records = [r for r in map(json.loads, (full / loop.METRICS_FILE).read_text().splitlines()) if r["step"] <= 4]
    (part / loop.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5')
    _, part_file = write_recipe(tiny_data, tmp_path, part, **{"train.batch_size": 4, "train.keep_last": 3,
                                                               "train.export": False, "train.max_steps": 6})
    proc = launch(part_file, "--resume", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output and "Traceback" not in output
    assert losses(part) == losses(full) and sorted(losses(part)) == list(range(1, 7))
    for name in ("teacher.safetensors", "model.safetensors"):
        a = load_file(str(full / "checkpoint-00000006" / name))
        b = load_file(str(part / "checkpoint-00000006" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((part / "checkpoint-00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 6


def _children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux")
def test_killing_the_launcher_ends_the_ranks(tiny_data, tmp_path):
    out = tmp_path / "run"
    _, recipe_file = write_recipe(tiny_data, tmp_path, out, **{"train.batch_size": 4, "train.max_steps": 100000,
                                                               "train.export": False, "train.save_every": 5})
    proc = launch(recipe_file, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not ckpt.list_checkpoints(out):  # both ranks are training and saving
            assert proc.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.5)
        ranks = _children(proc.pid)
        assert len(ranks) == 2, ranks
        proc.kill()  # SIGKILL: the launcher gets no chance to forward anything
        proc.wait()
        deadline = time.time() + 10
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in ranks):
            assert time.time() < deadline, f"ranks {ranks} still running 10 s after the launcher died"
            time.sleep(0.2)
        size = (out / loop.METRICS_FILE).stat().st_size
        time.sleep(2)
        assert (out / loop.METRICS_FILE).stat().st_size == size  # no orphan writes
    finally:
        if proc.poll() is None:
            proc.kill()
