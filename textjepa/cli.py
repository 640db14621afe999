"""`textjepa` console entry point: a thin dispatcher to each component's own `main(argv)` (COMMANDS).
`textjepa` alone or `textjepa --help` lists the commands; `textjepa --version` prints the version.

A failure ends with one line on stderr naming the file or key and what was expected, and a non-zero
exit code; `--debug` (anywhere on the command line) or TEXTJEPA_DEBUG=1 prints the traceback too.
"""

import importlib
import os
import sys
import traceback

# command -> what it does, for `textjepa` / `textjepa --help`
SUMMARIES = {
    "train": "pretrain an encoder from a YAML recipe (textjepa train --recipe recipes/quickstart.yaml)",
    "export": "write a checkpoint's encoder as a from_pretrained / SentenceTransformer directory",
    "evaluate": "score encoders on every task and retrieval folder under --data-dir (one table)",
    "glue": "linear probe or fine-tune an encoder on one GLUE-style task",
    "whiten": "fit SIF token weights and whitening on unlabeled text and ship them inside an encoder directory",
    "tokenizer": "train a tokenizer on text files (textjepa tokenizer train --source ... --output DIR)",
}

# command -> (module, function). Imports are lazy so `textjepa --help` stays instant.
COMMANDS = {
    "tokenizer": ("textjepa.tokenization", "cli_main"),
    "train": ("textjepa.train", "main"),
    "export": ("textjepa.training.export", "main"),
    "evaluate": ("textjepa.evaluation.suite", "main"),
    "glue": ("textjepa.evaluation.glue", "main"),
    "whiten": ("textjepa.embedding.encoder", "whiten_main"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from textjepa import __version__

        print(f"textjepa {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"textjepa: unknown command {command!r}; expected one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[command]
    return run(f"textjepa {command}", lambda args: getattr(importlib.import_module(module_name), function_name)(args),
               rest)


def usage() -> str:
    width = max(len(name) for name in SUMMARIES)
    lines = ["usage: textjepa <command> [options]   (textjepa <command> --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {SUMMARIES[name]}" for name in SUMMARIES]
    lines += ["", "  --version     print the version", "  --debug       (any command) print the traceback of a failure"]
    return "\n".join(lines)


def one_line(err: BaseException) -> str:
    """An exception as one line: our own and the builtin errors carry a message that names the file or
    key; a library's error keeps its type name so that it can be looked up."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip()) or repr(err)
    if len(text) > 600:  # the name comes first; a library's list of every mismatch does not help
        text = text[:600] + " ..."
    module = type(err).__module__
    if module == "builtins" or module.startswith("textjepa"):
        return text
    return f"{type(err).__name__}: {text}"


def run(prog: str, function, argv) -> int:
    """Call `function(argv)`; turn any exception into one line `prog: message` and exit code 1."""
    argv = list(argv)
    debug = "--debug" in argv or os.environ.get("TEXTJEPA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(function(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every command's failure is reported
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"{prog}: {one_line(err)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
