"""Pretrain a Text-JEPA (or the MLM baseline) from a YAML recipe.

    textjepa train --recipe recipes/quickstart.yaml
    python -m textjepa.train --recipe recipes/small.yaml --set train.max_steps=2000 --set optim.lr=3e-4
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m textjepa.train --recipe recipes/small.yaml
    textjepa train --recipe recipes/small.yaml --resume          # continue from the latest checkpoint
    textjepa train --recipe recipes/small.yaml --set objective=mlm --set train.output_dir=runs/small-mlm

Recipes: see recipes/*.yaml and textjepa/training/recipe.py for every key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="textjepa train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe (path, or a name in recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in train.output_dir")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from textjepa.training.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"textjepa train: {err}", file=sys.stderr)
        return 2
    if args.print_recipe:
        print(recipe.to_yaml())
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("textjepa").setLevel(logging.INFO)

    from textjepa.training.loop import TrainingStopped, format_summary, train

    try:
        summary = train(recipe, resume=args.resume)
    except TrainingStopped as err:
        print(f"textjepa train: {err}", file=sys.stderr)
        return 1
    except FileExistsError as err:
        print(f"textjepa train: {err}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(format_summary(summary))
        if summary.get("export") and recipe.log.sanity_check:
            from textjepa.evaluation.sanity import sanity_check

            print(sanity_check(summary["export"]))
    return 0


if __name__ == "__main__":  # python -m textjepa.train / accelerate launch -m textjepa.train
    from textjepa.cli import run

    sys.exit(run("textjepa train", main, sys.argv[1:]))
