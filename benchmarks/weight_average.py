"""Average exports in weight space: start + alpha * (mean(runs) - start).

With one run this is weight-space interpolation between the start and the adapted model (WiSE-FT, Wortsman et al.
2022: alpha 0.5 is halfway, alpha > 1 goes further along the same direction); with several runs from the same start
and alpha 1 it is a uniform model soup (Wortsman et al. 2022). The output folder is a copy of the first run's export
(config, tokenizer, sentence-transformers layout) with the averaged model.safetensors, so `textjepa evaluate` and
plain transformers read it as they read the run. docs/adapt.md, eleventh round, has what it measured:

    python benchmarks/weight_average.py --start $MINILM --run RUN/export --alpha 0.5 --out OUT
    python benchmarks/weight_average.py --start $MINILM --run A/export --run B/export --run C/export --out OUT
"""

import argparse
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from textjepa.training.checkpoint import replace_directory

WEIGHTS = "model.safetensors"


def average(start: dict, runs: list[dict], alpha: float) -> dict:
    """start + alpha * (mean(runs) - start), tensor by tensor, in float32, back in each tensor's own dtype."""
    mixed = {}
    for name, first in runs[0].items():
        mean = sum(run[name].float() for run in runs) / len(runs)
        base = start[name].float()
        mixed[name] = (base + alpha * (mean - base)).to(first.dtype).contiguous()
    return mixed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", required=True, help="the export every run started from (a model.safetensors folder)")
    parser.add_argument("--run", action="append", required=True, help="an adapted export (repeat for a soup)")
    parser.add_argument("--alpha", type=float, default=1.0, help="how far from the start towards the runs' mean")
    parser.add_argument("--out", required=True, help="folder to write (a copy of the first run's export)")
    args = parser.parse_args(argv)

    folders = [Path(args.start)] + [Path(run) for run in args.run]
    for folder in folders:
        if not (folder / WEIGHTS).is_file():
            print(f"error: {folder}: no {WEIGHTS} (expected an export folder)", file=sys.stderr)
            return 2
    start, *runs = [load_file(str(folder / WEIGHTS)) for folder in folders]
    # the runs hold the same tensors; the start holds them too (and may hold more: e.g. an old export's
    # embeddings.position_ids buffer, which the averaged folder, a copy of the first run's, does not need)
    for folder, state in zip(folders, [start] + runs):
        odd = sorted(set(runs[0]) - set(state)) if state is start else sorted(set(state) ^ set(runs[0]))
        if odd:
            print(f"error: {folder / WEIGHTS}: tensor names differ from {folders[1] / WEIGHTS} (e.g. {odd[:3]}): "
                  "every folder must hold the same architecture", file=sys.stderr)
            return 2
    out = Path(args.out)
    # the whole folder is built beside OUT, then put in place: never the first run's weights under OUT's name
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folders[1], tmp)
    save_file(average(start, runs, args.alpha), str(tmp / WEIGHTS), metadata={"format": "pt"})
    replace_directory(tmp, out)
    print(f"{out}: start + {args.alpha} * (mean of {len(runs)} run(s) - start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
