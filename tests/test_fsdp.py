"""FSDP2 with two CPU processes over gloo (recipes/accelerate/fsdp_cpu_2proc.yaml): the student is
sharded (DTensors), the EMA teacher is a full copy made before sharding and updated from the
all-gathered student, checkpoints hold accelerate's sharded state + model.safetensors +
teacher.safetensors, resume is exact and the export is the teacher. What only GPUs can show (NCCL,
bf16 mixed-precision policy, memory savings, speed) is not checked here."""

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_data, tiny_recipe  # noqa: F401 (fixture)

from textjepa.training import loop

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "recipes" / "accelerate" / "fsdp_cpu_2proc.yaml"
STEPS = 4

pytestmark = pytest.mark.slow


def launch_fsdp(recipe_file, *args, timeout=300):
    from test_faults import env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--main_process_port", str(port), "-m", "textjepa.train", "--recipe", str(recipe_file), *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def write(tiny_data, tmp_path, out):
    recipe = tiny_recipe(tiny_data, out, **{"train.batch_size": 4, "train.max_steps": STEPS, "train.save_every": 1,
                                            "train.keep_last": STEPS, "train.export": True,
                                            "log.sanity_check": False})
    path = tmp_path / f"{Path(out).name}.yaml"
    recipe.save(path)
    return path


def test_fsdp_two_cpu_processes_train_ema_resume_export(tiny_data, tmp_path):
    full = tmp_path / "full"
    result = launch_fsdp(write(tiny_data, tmp_path, full))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "2 process(es), FSDP" in output and "Traceback" not in output
    checkpoints = [full / f"checkpoint-{step:08d}" for step in range(1, STEPS + 1)]
    assert all((c / "pytorch_model_fsdp_0").is_dir() for c in checkpoints)  # accelerate's sharded state

    records = [json.loads(line) for line in (full / loop.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    # the teacher is an EMA of the (gathered) student: teacher_k = lerp(teacher_k-1, student_k, 1 - m_k)
    teachers = [load_file(str(c / "teacher.safetensors")) for c in checkpoints]
    students = [load_file(str(c / "model.safetensors")) for c in checkpoints]
    for k in range(1, STEPS):
        momentum = records[k]["momentum"]
        for name, teacher in teachers[k].items():
            expected = torch.lerp(teachers[k - 1][name], students[k][f"textjepa.{name}"], 1.0 - momentum)
            torch.testing.assert_close(teacher, expected, rtol=0, atol=1e-6)
    assert any(not torch.equal(teachers[0][n], teachers[-1][n]) for n in teachers[0])  # it moved
    assert any(not torch.equal(teachers[-1][n], students[-1][f"textjepa.{n}"]) for n in teachers[-1])  # it lags
    exported = load_file(str(full / "export" / "model.safetensors"))
    assert exported.keys() == teachers[-1].keys()
    assert all(torch.equal(exported[n], teachers[-1][n]) for n in exported)

    # resume from step 2 in a copy: the same losses and the same final student and teacher, bit for bit
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-00000002", part / "checkpoint-00000002")
    result = launch_fsdp(write(tiny_data, tmp_path, part), "--resume")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "resumed from" in output
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (part / loop.METRICS_FILE).read_text().splitlines())}
    assert resumed == {r["step"]: r["loss"] for r in records if r["step"] > 2}
    for name in ("teacher.safetensors", "model.safetensors"):
        a, b = load_file(str(checkpoints[-1] / name)), load_file(str(part / checkpoints[-1].name / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # `textjepa export` reads an FSDP checkpoint too (its full model.safetensors)
    from transformers import AutoModel

    from textjepa.training.export import main as export_main

    assert export_main(["--checkpoint", str(checkpoints[-1]), "--output", str(tmp_path / "s"), "--which", "student"]) == 0
    student = AutoModel.from_pretrained(tmp_path / "s").state_dict()
    assert all(torch.equal(student[n], students[-1][f"textjepa.{n}"]) for n in student)


def test_fsdp_adaptation_run_resumes_its_queue_exactly_and_exports_the_source_architecture(tmp_path):
    """recipes/adapt.yaml's parts under FSDP2, from a tiny BertModel: a frozen teacher, no token predictor, the
    queue of the teacher's vectors and the drift budget. The queue's buffers are not sharded; the checkpoint's full
    state carries them, a resume from step 2 ends with the same student, queue and scale, bit for bit, and the
    export is a BertModel again."""
    from test_conversion import adapt_recipe, random_source
    from test_train import QUEUED_RUN
    from transformers import BertModel

    random_source(tmp_path / "start", "bert")
    adapt = {**QUEUED_RUN, "model.pooled_reg_drift_budget": 1e-6, "model.cross_view_loss_weight": 0.0,
             "model.pooled_head": "identity", "train.save_every": 1, "train.keep_last": STEPS,
             "train.export_which": "student",
             "log.min_std": 0.0}  # a tiny random start predicts with little spread: not what this test is about

    def queued(name):
        (tmp_path / name).mkdir(exist_ok=True)
        recipe = adapt_recipe(tmp_path / name, tmp_path / "start", **adapt)
        path = tmp_path / f"{name}.yaml"
        recipe.save(path)
        return path

    result = launch_fsdp(queued("full"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "2 process(es), FSDP" in output and "Traceback" not in output
    full = tmp_path / "full" / "run"
    last = load_file(str(full / f"checkpoint-{STEPS:08d}" / "model.safetensors"))
    assert int(last["pooled_bank_seen"]) > 0 and float(last["pooled_reg_scale"]) < 1.0  # queued; the budget acted
    assert isinstance(BertModel.from_pretrained(full / "export"), BertModel)

    shutil.copytree(full / "checkpoint-00000002", tmp_path / "part" / "run" / "checkpoint-00000002")
    result = launch_fsdp(queued("part"), "--resume")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    resumed = load_file(str(tmp_path / "part" / "run" / f"checkpoint-{STEPS:08d}" / "model.safetensors"))
    assert last.keys() == resumed.keys() and all(torch.equal(last[k], resumed[k]) for k in last)
