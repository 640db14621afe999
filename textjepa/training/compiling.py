"""`train.compile: true`: the trained model's forward (and so its backward) through torch.compile
(inductor), for one run.

The model is compiled in place (`nn.Module.compile`) after accelerate's prepare, so the object is the
same one: its state_dict keys, accelerate's save_state / load_state, the checkpoints and the exports are
those of an eager run (`torch.compile(model)`, and accelerate's `dynamo_backend`, which calls it, would
wrap the model and prefix every key with `_orig_mod.`). Under DDP the inner module is the compiled one.
The EMA teacher (a plain attribute, moved in place by update_teacher after each optimizer step) is a
graph input on every call, never a constant baked into the graph.

Shapes: the batches are rectangular (masking gives exact context / target counts), so what changes from
step to step are the sizes after data-dependent selections (e.g. the segments a row saw), which are
graph breaks. With `dynamic=None` dynamo recompiles a graph once, with that size symbolic, the first time
it changes, and then reuses it: a run compiles its graphs in its first steps and none later.
CompileWatch counts them and the run prints one line (and summary["compile"]).
"""

from __future__ import annotations

import contextlib
import time

import torch

ADVICE = "set train.compile: false to train without it"
BACKEND = "inductor"  # torch.compile's default; tests swap in "aot_eager" (same tracing, no C++ build)


def _first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_cpp_compiler() -> None:
    """Inductor builds C++ kernels for the CPU: fail before training, in one line, without a compiler."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: the first step reports it (compile_errors)
        return
    try:
        get_cpp_compiler()
    except Exception as err:  # InvalidCxxCompiler
        raise RuntimeError(f"train.compile: torch.compile needs a C++ compiler on the CPU and found none "
                           f"({_first_line(err)}); install g++ or point $CXX at one, or {ADVICE}") from None


def compile_forward(model, device, sharded: bool):
    """Compile `model`'s forward in place; returns the undo (the model is eager again after the run)."""
    if sharded:
        raise RuntimeError(f"train.compile: not supported with FSDP (untested here); {ADVICE}")
    if device.type == "cpu" and BACKEND == "inductor":
        check_cpp_compiler()
    # a fresh start: graphs of an earlier run in this process (another model object) would only count
    # against dynamo's recompile limit, past which it silently runs the forward eagerly
    torch._dynamo.reset()
    model.compile(backend=BACKEND, dynamic=None)

    def undo():
        model._compiled_call_impl = None  # what nn.Module.compile set

    return undo


def _from_compiler(err: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException

    module = type(err).__module__ or ""
    return isinstance(err, TorchDynamoException) or module.startswith(("torch._inductor", "torch._dynamo"))


@contextlib.contextmanager
def compile_errors(enabled: bool, step: int):
    """A failure inside torch.compile (tracing, inductor, the C++ build) as one line naming
    train.compile; any other error passes unchanged."""
    if not enabled:
        yield
        return
    try:
        yield
    except Exception as err:
        if not _from_compiler(err):
            raise
        inner = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed wraps the real one
        raise RuntimeError(f"train.compile: torch.compile failed in step {step + 1}: "
                           f"{_first_line(inner)[:300]}; {ADVICE}") from err


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Graphs compiled during the run (dynamo's unique_graphs counter, from this run's start): how many,
    how many in the first step of the session, the last step that compiled one, and that first step's
    wall time (the compile cost, with one step of work)."""

    def __init__(self):
        self.start, self.base = time.perf_counter(), _graphs()
        self.first_step_s = None
        self.graphs_first_step = None
        self.last_compile_step = None  # optimizer step (1-based) after which the count last grew
        self._seen = 0

    def step_done(self, step: int) -> None:
        graphs = _graphs() - self.base
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.start
            self.graphs_first_step = graphs
        if graphs > self._seen:
            self.last_compile_step, self._seen = step, graphs

    def summary(self) -> dict:
        return {"graphs": _graphs() - self.base, "graphs_first_step": self.graphs_first_step,
                "last_compile_step": self.last_compile_step, "first_step_s": self.first_step_s}

    def line(self) -> str:
        s = self.summary()
        first = "n/a" if s["first_step_s"] is None else f"{s['first_step_s']:.1f}s"
        return (f"train.compile: {s['graphs']} graph(s) compiled, {s['graphs_first_step']} in the first step "
                f"({first} with the compile), the last after step {s['last_compile_step']}")
