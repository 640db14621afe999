"""train.compile: the recipe key, the one-line errors, and a compiled tiny run against the eager one
(losses, checkpoint and export keys, resume, the EMA teacher, how many graphs are compiled)."""

from pathlib import Path

import pytest
import torch
from test_train import losses, quiet, teacher_state, tiny_data, tiny_recipe  # noqa: F401 (tiny_data: fixture)

from textjepa.training import loop
from textjepa.training.recipe import RecipeError, parse_recipe


def test_compile_key_defaults_off_and_is_a_bool():
    assert parse_recipe({}).train.compile is False
    assert parse_recipe({}, overrides=["train.compile=true"]).train.compile is True
    with pytest.raises(RecipeError, match=r"train\.compile: expected bool, got 'fast'"):
        parse_recipe({"train": {"compile": "fast"}})


def test_no_cpp_compiler_is_one_line_before_any_step(tiny_data, tmp_path):  # noqa: F811
    from torch._inductor import config

    from textjepa.cli import one_line

    # torch's own config.patch (monkeypatch's undo of a torch config key deletes it for later tests)
    with config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-c++"))}), \
            pytest.raises(RuntimeError, match=r"^train\.compile: torch\.compile needs a C\+\+ compiler") as err:
        loop.train(tiny_recipe(tiny_data, tmp_path / "run", **{"train.compile": True}), announce=quiet)
    line = one_line(err.value)
    assert "\n" not in line and "set train.compile: false" in line and "$CXX" in line
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_compile_failure_in_a_step_names_train_compile():
    from torch._dynamo.exc import BackendCompilerFailed

    from textjepa.training.compiling import compile_errors

    inner = RuntimeError("C++ compile error\ncommand: g++ ... (hundreds of lines)")
    with pytest.raises(RuntimeError, match=r"^train\.compile: torch\.compile failed in step 3: RuntimeError: C\+\+ "
                                           r"compile error; set train\.compile: false") as err:
        with compile_errors(True, 2):
            raise BackendCompilerFailed(lambda: None, inner, None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not from the compiler"):  # other errors pass unchanged
        with compile_errors(True, 2):
            raise ValueError("not from the compiler")


def test_compiled_forward_reads_the_teacher_it_is_given(tiny_config):
    """The EMA teacher is a plain attribute moved in place after each step: the compiled graph must read
    its current values, never constants from the first call (dynamo semantics: aot_eager is enough)."""
    from textjepa import TextJepaForPreTraining
    from textjepa.masking import MaskingConfig, SpanMaskCollator

    torch.manual_seed(0)
    model = TextJepaForPreTraining(tiny_config).train()
    model.teacher  # noqa: B018 - created from the student
    batch = SpanMaskCollator(MaskingConfig(num_masks=2))([{"input_ids": torch.randint(5, 97, (32,))} for _ in range(4)])

    def loss():
        with torch.no_grad():
            return float(model(**batch).loss)

    eager = loss()
    model.compile(backend="aot_eager")
    try:
        assert loss() == pytest.approx(eager, rel=1e-6)
        with torch.no_grad():
            for p in model.textjepa.parameters():
                p.mul_(0.5)
        model.update_teacher(0.0)  # teacher := student, in place
        compiled = loss()
        model._compiled_call_impl = None
        assert compiled == pytest.approx(loss(), rel=1e-6) and abs(compiled - eager) > 1e-3
    finally:
        model._compiled_call_impl = None
        torch._dynamo.reset()


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def test_compiled_run_matches_eager_keeps_keys_and_resumes(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """The loop's side, with torch.compile's aot_eager backend (dynamo tracing, guards, graph breaks and
    AOT autograd as with inductor, without the minutes of C++ builds; inductor itself: the next test).
    Eager 8 steps vs compiled 4 steps + a compiled resume to 8. The EMA momentum is low (0.9) so that
    the teacher moves and a stale teacher would show in the losses."""
    from textjepa.training import compiling

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    settings = {"train.max_steps": 8, "train.save_every": 4, "train.export": True, "log.sanity_check": False,
                "ema.momentum_start": 0.9, "ema.momentum_end": 0.9}
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    compiled_models, compile_forward = [], loop.compile_forward
    monkeypatch.setattr(loop, "compile_forward", lambda model, *args: compiled_models.append(model) or
                        compile_forward(model, *args))
    loop.train(tiny_recipe(tiny_data, eager_dir, **settings), announce=quiet)
    first = loop.train(tiny_recipe(tiny_data, compiled_dir, **settings, **{"train.compile": True,
                                                                            "train.stop_after": 4}), announce=quiet)
    said = []
    rest = loop.train(tiny_recipe(tiny_data, compiled_dir, **settings, **{"train.compile": True}), resume=True,
                      announce=said.append)
    # graphs are compiled in the first steps of each session only (sizes after the mask-dependent
    # selections become symbolic after their first change), not once per step
    assert first["compile"]["graphs"] > 0 and first["compile"]["last_compile_step"] <= 3, first["compile"]
    assert rest["compile"]["graphs"] > 0 and rest["compile"]["last_compile_step"] <= 4 + 3, rest["compile"]
    assert any(line.startswith("train.compile: ") and "graph(s) compiled" in line for line in said), said
    eager_losses, compiled_losses = losses(eager_dir), losses(compiled_dir)
    assert sorted(compiled_losses) == list(range(1, 9))
    for step in range(1, 9):
        assert compiled_losses[step] == pytest.approx(eager_losses[step], rel=1e-5), step
    a, b = teacher_state(eager_dir / "checkpoint-00000008"), teacher_state(compiled_dir / "checkpoint-00000008")
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    # checkpoints and exports: the eager run's keys, no `_orig_mod.` prefix
    for checkpoint in ("checkpoint-00000004", "checkpoint-00000008"):
        keys = _keys(compiled_dir / checkpoint / "model.safetensors")
        assert keys == _keys(eager_dir / checkpoint / "model.safetensors")
        assert not any("_orig_mod" in key for key in keys)
    assert _keys(compiled_dir / "export" / "model.safetensors") == _keys(eager_dir / "export" / "model.safetensors")
    # compiled in place for the run only: the model is eager again afterwards
    assert len(compiled_models) == 2 and all(m._compiled_call_impl is None for m in compiled_models)
    assert Path(rest["checkpoint"]).name == "checkpoint-00000008"


def _three_steps_compiled_match_eager(tiny_data, tmp_path, settings):  # noqa: F811
    """A 3-step run with and without train.compile: every graph compiled by step 2, losses within rel
    1e-5, the same checkpoint keys."""
    settings = {**settings, "train.max_steps": 3}
    loop.train(tiny_recipe(tiny_data, tmp_path / "eager", **settings), announce=quiet)
    summary = loop.train(tiny_recipe(tiny_data, tmp_path / "compiled", **settings, **{"train.compile": True}),
                         announce=quiet)
    assert summary["compile"]["graphs"] > 0 and summary["compile"]["last_compile_step"] <= 2, summary["compile"]
    eager_losses, compiled_losses = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    for step in (1, 2, 3):
        assert compiled_losses[step] == pytest.approx(eager_losses[step], rel=1e-5), step
    checkpoint = "checkpoint-00000003"
    assert _keys(tmp_path / "compiled" / checkpoint / "model.safetensors") == \
        _keys(tmp_path / "eager" / checkpoint / "model.safetensors")


def test_compiled_mlm_baseline_matches_eager(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """objective mlm (HF RobertaForMaskedLM) through the same switch (aot_eager, as above)."""
    from textjepa.training import compiling

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    _three_steps_compiled_match_eager(tiny_data, tmp_path, {"objective": "mlm"})


@pytest.mark.slow
def test_inductor_run_matches_eager(tiny_data, tmp_path):  # noqa: F811
    """The real compiler, kept small: its C++ builds take ~70 s on a cold inductor cache (2 idle cores),
    ~7 s on a warm one (/tmp/torchinductor_<user>), so no sentence target (fewer graphs) and 3 steps. Tolerance rel 1e-5 on the losses: inductor's fused fp32 kernels round differently from
    the eager ops (1e-7 relative seen over 8 steps of the quickstart objective), while a wrong graph (a
    stale teacher, a mask mix-up) moves a loss by far more than 1e-3."""
    _three_steps_compiled_match_eager(tiny_data, tmp_path, {"model.sentence_loss_weight": 0.0})


def test_compile_speed_benchmark_table_and_overrides():
    """benchmarks/compile_speed.py's pure parts (its runs compile for minutes: made by hand, see
    benchmarks/README.md)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compile_speed

    recipe = parse_recipe({}, overrides=compile_speed.overrides("small", "bf16", True, 6, 1, "/tmp/x")[2:])
    assert recipe.train.compile and recipe.train.mixed_precision == "bf16" and recipe.train.max_steps == 6
    assert recipe.log.every == 1 and recipe.train.export is False and recipe.log.trackers == ["jsonl"]

    def run(first, steady, compiled):
        return {"step_s": [first, 2.0, steady, steady, steady, 9.0],
                "compile": {"graphs": 7, "last_compile_step": 2} if compiled else None}

    results = {("mini", "fp32", "eager"): [run(1.5, 1.0, False)] * 3,  # round 1 compiles cold, rounds 2-3 warm
               ("mini", "fp32", "compile"): [run(41.5, 0.8, True), run(10.0, 0.9, True), run(13.0, 0.7, True)]}
    text = compile_speed.table(results)
    # speed-up 1.0 / 0.8; break-even: (41.5 - 1.5) / 0.2 cold, (11.5 - 1.5) / 0.2 warm
    assert "| mini | fp32 | 1.50 | 41.5 / 11.5 | 1.000 | 0.800 | 1.25x | 7/7/7 | 2/2/2 | 200 / 50 |" in text, text
    results[("mini", "fp32", "compile")] = [run(41.5, 1.1, True)]
    assert "| 41.5 / - | 1.000 | 1.100 | 0.91x | 7 | 2 | never / - |" in compile_speed.table(results)
