"""The shared command line of the per-task evaluation modules (python -m textjepa.evaluation.sts / .retrieval)."""

import json
import sys


def hyphenated(arg):
    """--task_dir=X -> --task-dir=X; values and other arguments as they are."""
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value if arg.startswith("--") else arg


def encoder_main(argv, description, add_arguments, evaluate, summary, prog=None):
    """The shared `main()` of the per-task modules (sts, retrieval): --model and --pooling (+ the task's
    own flags from add_arguments(parser)); evaluate(args) -> results, printed as summary(args, results)
    and written with bootstrap intervals to --output. Flags are spelled with hyphens like `textjepa
    evaluate`'s; the underscore spellings these modules first had (--task_dir) still work."""
    import argparse

    from textjepa.evaluation.metrics import with_intervals

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", required=True)
    add_arguments(parser)
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    parser.add_argument("--output", default=None)
    args = parser.parse_args([hyphenated(arg) for arg in (sys.argv[1:] if argv is None else argv)])
    results = evaluate(args)
    print(summary(args, results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(with_intervals(results), f, indent=2)
    return 0
