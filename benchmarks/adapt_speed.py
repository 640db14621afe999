"""Tokens/s of one adaptation step: textjepa (recipes/adapt.yaml) against SimCSE, TSDAE and continued MLM,
measured in one process with the methods interleaved (machines here drift 10-30%: only ratios within one run
count). textjepa runs in fp32 and under bf16 autocast, so `train.mixed_precision: auto` can be judged by what is
faster on this machine.

    python benchmarks/adapt_speed.py --start DIR --target RETRIEVAL_DIR [--rounds 5] [--steps 2] [--out OUT.json]

Tokens are text tokens consumed per optimizer step (each training text's tokens once, as the method truncates
them): textjepa reads train.batch_size blocks of data.block_size tokens of packed documents, the peers read
--batch-size documents (truncated to --max-length tokens). Each round runs --steps steps of every method in
turn after one untimed warm-up step each; the figure is tokens over seconds summed over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_peers import PEER_METHODS, PeerTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class JepaStep:
    """The trainer's step for recipes/adapt.yaml without accelerate: forward, backward, clip, AdamW, EMA."""

    def __init__(self, start, corpus, recipe_path, bf16, seed=0):
        import datasets

        from textjepa.data import pack_dataset
        from textjepa.training.batches import JepaBatchMaker, masking_config, resolve_tokenizer
        from textjepa.training.build import build_model, build_optimizer
        from textjepa.training.recipe import load_recipe

        torch.manual_seed(seed)
        self.recipe = load_recipe(recipe_path, [f"model.init_from={start}", f"data.source={corpus}"])
        tokenizer = resolve_tokenizer(self.recipe, Path("."), True)
        texts = [json.loads(line)["text"] for line, _ in zip(open(corpus), range(4000))]
        blocks = pack_dataset(datasets.Dataset.from_dict({"text": texts}), tokenizer, self.recipe.data.block_size)
        self.blocks = np.asarray(blocks["input_ids"])
        self.make_batch = JepaBatchMaker(masking_config(self.recipe, tokenizer))
        self.model = build_model(self.recipe, tokenizer).train()
        self.model.teacher  # the EMA copy, as the trainer makes it
        self.optimizer = build_optimizer(self.model, self.recipe, torch.device("cpu"))
        self.bf16, self.position, self.batch_size = bf16, 0, self.recipe.train.batch_size

    def step(self) -> int:
        rows = [(self.position + i) % len(self.blocks) for i in range(self.batch_size)]
        self.position += self.batch_size
        batch = self.make_batch(self.blocks[rows], [(0, r) for r in rows])
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_teacher(self.recipe.ema.momentum_start)
        return self.batch_size * self.recipe.data.block_size


class PeerStep:
    def __init__(self, method, start, texts, batch_size, max_length, seed=0):
        self.trainer = PeerTrainer(method, str(start), batch_size=batch_size, max_length=max_length, seed=seed)
        self.texts, self.batch_size, self.rng = texts, batch_size, random.Random(seed)

    def step(self) -> int:
        self.trainer.step(self.rng.sample(self.texts, self.batch_size))
        return self.trainer.text_tokens


def measure(steppers: dict, rounds: int, steps: int) -> dict:
    for stepper in steppers.values():
        stepper.step()  # warm-up, untimed
    tokens, seconds = dict.fromkeys(steppers, 0), dict.fromkeys(steppers, 0.0)
    for _ in range(rounds):
        for name, stepper in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                tokens[name] += stepper.step()
            seconds[name] += time.perf_counter() - start
    return {name: {"tokens": tokens[name], "seconds": seconds[name], "tokens_per_s": tokens[name] / seconds[name]}
            for name in steppers}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=Path, required=True)
    parser.add_argument("--target", type=Path, required=True, help="BEIR folder; its corpus.jsonl is the text")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "adapt.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps of each method per round")
    parser.add_argument("--batch-size", type=int, default=32, help="peers' texts per step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["textjepa", "textjepa-bf16", *PEER_METHODS])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = args.target / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line, _ in zip(open(corpus), range(4000))]
    steppers = {}
    for method in args.methods:
        if method.startswith("textjepa"):
            steppers[method] = JepaStep(args.start, corpus, args.recipe, bf16=method.endswith("bf16"))
        else:
            steppers[method] = PeerStep(method, args.start, texts, args.batch_size, args.max_length)
    result = measure(steppers, args.rounds, args.steps)
    base = result.get("textjepa", next(iter(result.values())))["tokens_per_s"]
    print(f"| method | tokens/s | textjepa (fp32) / method |\n|---|---|---|")
    for name, row in result.items():
        print(f"| {name} | {row['tokens_per_s']:,.0f} | {base / row['tokens_per_s']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rounds": args.rounds, "steps": args.steps,
                                        "result": result}, indent=1))
    return result


if __name__ == "__main__":
    main()
