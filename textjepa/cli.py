"""`textjepa` console entry point: a thin dispatcher to each component's own `main(argv)`.

    textjepa tokenizer train ...   -> textjepa.tokenization.cli_main
    textjepa train ...             -> textjepa.train.main
    textjepa export ...            -> textjepa.training.export.main
    textjepa evaluate ...          -> textjepa.evaluation.suite.main
    textjepa glue ...              -> textjepa.evaluation.glue.main
    textjepa whiten ...            -> textjepa.evaluation.whitening.main
"""

import importlib
import sys

# command -> (module, function). Imports are lazy so `textjepa --help` stays instant.
COMMANDS = {
    "tokenizer": ("textjepa.tokenization", "cli_main"),
    "train": ("textjepa.train", "main"),
    "export": ("textjepa.training.export", "main"),
    "evaluate": ("textjepa.evaluation.suite", "main"),
    "glue": ("textjepa.evaluation.glue", "main"),
    "whiten": ("textjepa.evaluation.whitening", "main"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: textjepa {" + ",".join(COMMANDS) + "} [args...]\n" + (__doc__ or ""))
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"textjepa: unknown command {command!r}; expected one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[command]
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
