"""The quickstart corpus shipped inside the package (works offline on a fresh machine).

quickstart.txt.gz: ~8 M characters (~3 MB compressed) of public-domain English: Moby-Dick,
Shakespeare's plays (one document per scene) and every 6th US State of the Union address.
Documents are separated by a blank line. See make_corpus.py for how it was built.
tokenizer.json / tokenizer_config.json: an 8000-piece unigram tokenizer trained on this corpus with
textjepa.tokenization.train_tokenizer (`data.tokenizer: quickstart`), so the quickstart skips tokenizer
training.

In a recipe, `data.source: quickstart` means this corpus.
"""

import gzip
import os
import shutil
from pathlib import Path

QUICKSTART_NAME = "quickstart"
QUICKSTART_GZ = Path(__file__).with_name("quickstart.txt.gz")


def quickstart_text_file(directory) -> Path:
    """Decompress the corpus once into `directory` (paragraph-mode .txt that textjepa.data reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "quickstart.txt"
    if not target.exists() or target.stat().st_mtime < QUICKSTART_GZ.stat().st_mtime:
        tmp = directory / f".quickstart.txt.{os.getpid()}"
        with gzip.open(QUICKSTART_GZ, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return target
