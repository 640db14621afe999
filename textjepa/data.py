"""Text in, packed blocks of token ids out.

    load_text_dataset(sources)                -> datasets.Dataset with one column "text" (one document per row)
    load_tokenizer(path)                      -> PreTrainedTokenizerFast (ours or any HF tokenizer dir)
    build_pretraining_datasets(sources, tok, block_size) -> (train, valid), columns "input_ids" of
                                                 exactly block_size ints: documents joined by a separator
                                                 token (</s> for our tokenizers, [SEP] for BERT's), no padding;
                                                 and "first_document": which document the block's first token
                                                 is from (its d-th piece is from first_document + d)
    check_block_size(block_size, max_position_embeddings)  -> raises when the model cannot read a block

Sources are local files (.txt, .jsonl/.json, .csv, .parquet, or globs of them), directories written by
`save_to_disk` (a Dataset, or a DatasetDict's "train" split; read with load_from_disk) or hub dataset names
("wikitext" or "Salesforce/wikitext:wikitext-2-raw-v1": the part after ':' is the config; split "train").

Counted skips (logged, never silent): documents that are empty or whitespace-only after loading, and the
tail of each packing batch that does not fill a whole block. Everything else that is wrong is an error that
names the file or column: missing files, globs matching nothing, a corpus with no text, non-UTF-8 bytes in a
.txt file (pass encoding_errors="replace" to accept them), a text column that does not exist, a corpus too
small to fill one block.
"""

import glob
import logging
import os
import zlib

import numpy as np

logger = logging.getLogger(__name__)

# file extension -> datasets packaged builder
EXTENSION_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
GLOB_CHARS = set("*?[")


def datasets_builder(path: str) -> str | None:
    """The `datasets` packaged builder that reads `path`, by extension (a trailing .gz is looked through:
    the builders decompress it), or None."""
    name = path.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return EXTENSION_BUILDERS.get(os.path.splitext(name)[1])

# documents per datasets.map batch when packing: the unfilled tail of each batch (< block_size tokens)
# is dropped, so large batches waste less (1000 docs of ~200 tokens waste < 0.1%).
PACK_BATCH_DOCS = 1000


def _as_list(sources):
    if isinstance(sources, (str, os.PathLike)):
        return [os.fspath(sources)]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise ValueError("no data sources given: expected a path, glob or hub dataset name")
    return sources


def _is_local(source):
    return (
        os.path.exists(source)
        or any(c in source for c in GLOB_CHARS)
        or os.path.splitext(source)[1].lower() in EXTENSION_BUILDERS
        or source.startswith((".", "/", "~"))
    )


def is_saved_dataset(path):
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = os.path.expanduser(str(path))
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or (os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))))


def _load_saved_dataset(path, text_column, streaming):
    """A save_to_disk directory through load_from_disk (its JSON metadata is not data); of a DatasetDict,
    the "train" split, else every split concatenated."""
    import datasets

    loaded = datasets.load_from_disk(os.path.expanduser(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            ds = loaded["train"]
        else:
            logger.info("%s: no 'train' split; using all of %s", path, list(loaded))
            ds = datasets.concatenate_datasets([loaded[k] for k in loaded])
    else:
        ds = loaded
    ds = _select_text(ds, text_column, where=f"save_to_disk dataset {path!r}")
    return ds.to_iterable_dataset() if streaming else ds


def _expand_local(source):
    """A path, directory or glob -> sorted list of data files (a save_to_disk directory stays whole);
    raises when nothing matches."""
    path = os.path.expanduser(source)
    if is_saved_dataset(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(
            f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
            if os.path.splitext(f)[1].lower() in EXTENSION_BUILDERS
        )
        if not files:
            raise FileNotFoundError(
                f"directory {source!r} holds no data files (expected {sorted(EXTENSION_BUILDERS)})"
            )
        return files
    if any(c in path for c in GLOB_CHARS):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"glob {source!r} matched no files")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {source!r} does not exist")
    return [path]


def _check_utf8(path, encoding_errors):
    """Decode a .txt file incrementally so non-UTF-8 bytes fail here, naming file and byte offset."""
    if encoding_errors not in (None, "strict"):
        return
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: bytes at offset {offset + e.start} are not valid UTF-8 ({e.reason}); "
                    "fix the file or pass encoding_errors='replace' to substitute U+FFFD"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: file ends inside a UTF-8 sequence at byte {offset + e.start}") from None


def _load_group(builder, files, text_column, txt_mode, streaming, cache_dir, encoding_errors):
    import datasets

    kwargs = {}
    if builder == "text":
        if txt_mode not in ("paragraph", "line", "document"):
            raise ValueError(f"txt_mode must be 'paragraph', 'line' or 'document', got {txt_mode!r}")
        for f in files:
            _check_utf8(f, encoding_errors)
        kwargs = dict(sample_by=txt_mode)
        if encoding_errors not in (None, "strict"):
            kwargs["encoding_errors"] = encoding_errors
    if builder == "csv" and all(f.lower().endswith(".tsv") for f in files):
        kwargs["sep"] = "\t"
    ds = datasets.load_dataset(
        builder, data_files=files, split="train", streaming=streaming, cache_dir=cache_dir, **kwargs
    )
    if builder == "text" and txt_mode == "paragraph":
        # blocks split on "\n\n" keep the newlines of longer blank runs: strip them
        ds = ds.map(_strip_text, batched=True, **({} if streaming else dict(desc="stripping paragraphs")))
    column = "text" if builder == "text" else text_column
    return _select_text(ds, column, where=f"{builder} files {files[:3]}{' ...' if len(files) > 3 else ''}")


def _select_text(ds, column, where):
    columns = ds.column_names
    if columns is None:  # a streaming dataset whose schema is unknown until the first row
        columns = list(next(iter(ds.take(1)), {}).keys())
    if column not in columns:
        raise KeyError(f"text column {column!r} not found in {where}; available columns: {columns}")
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    return ds


def _strip_text(batch):
    return {"text": [t.strip() for t in batch["text"]]}


def _drop_empty(batch):
    return [t is not None and bool(t.strip()) for t in batch["text"]]


def load_text_dataset(sources, text_column="text", txt_mode="paragraph", streaming=False, cache_dir=None,
                      encoding_errors=None, num_proc=None, with_source=False):
    """Load documents from local files and/or hub names into one dataset with a single "text" column.

    txt_mode: "paragraph" (blank-line separated blocks, the default), "line", or "document" (a file is one
    document). text_column names the column in jsonl/csv/parquet/hub data; it is renamed to "text".
    Empty or whitespace-only documents are dropped and counted (logged). Raises on missing files, unknown
    columns, non-UTF-8 .txt bytes (unless encoding_errors="replace"/"ignore") and corpora with no text.
    with_source=True adds a "source" column: the file name without extension (a save_to_disk directory's
    name, a hub dataset's name), which apply_source_weights reads.
    """
    import datasets

    groups = {}  # (builder, file or None) -> list of files, in the order given
    parts, names, tags = [], [], []  # tags: each part's source name (with_source)
    for source in _as_list(sources):
        if _is_local(source):
            for f in _expand_local(source):
                if is_saved_dataset(f):
                    parts.append(_load_saved_dataset(f, text_column, streaming))
                    names.append(f"save_to_disk dataset {f!r}")
                    tags.append(source_name(f))
                    continue
                ext = os.path.splitext(f)[1].lower()
                if ext not in EXTENSION_BUILDERS:
                    raise ValueError(f"{f}: unsupported file type {ext!r}; expected one of {sorted(EXTENSION_BUILDERS)}")
                # one group per builder; per file when each document must know its file
                groups.setdefault((EXTENSION_BUILDERS[ext], f if with_source else None), []).append(f)
        else:
            name, _, config = source.partition(":")
            ds = datasets.load_dataset(name, config or None, split="train", streaming=streaming, cache_dir=cache_dir)
            parts.append(_select_text(ds, text_column, where=f"hub dataset {source!r}"))
            names.append(f"hub dataset {source!r}")
            tags.append(source_name(name))
    for (builder, _), files in groups.items():
        empty = [f for f in files if os.path.getsize(f) == 0]
        if empty:
            raise ValueError(f"{empty[0]}: the file is empty; expected {builder} data with a text column")
        try:
            parts.append(_load_group(builder, files, text_column, txt_mode, streaming, cache_dir, encoding_errors))
        except datasets.exceptions.DatasetGenerationError as err:
            cause = err.__cause__ or err
            raise ValueError(f"{files[0] if len(files) == 1 else files}: cannot be read as {builder} data "
                             f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from err
        names.append(f"{files[:3]}{' ...' if len(files) > 3 else ''}")
        tags.append(source_name(files[0]))

    # every part's "text" must be a string column before concatenation (csv/json may infer numbers):
    # the numbers become documents, counted and reported
    if not streaming:
        for i, (part, name) in enumerate(zip(parts, names)):
            if part.features["text"] != datasets.Value("string"):
                non_null = sum(1 for v in part["text"] if v is not None)
                logger.warning("%s: %d of %d %r values are numbers (%s), not strings; they are kept as "
                               "documents of their decimal text", name, non_null, len(part), text_column,
                               part.features["text"].dtype)
                parts[i] = part.cast_column("text", datasets.Value("string"))
    if with_source:
        parts = [part.map(lambda batch, tag=tag: {"source": [tag] * len(batch["text"])}, batched=True,
                          **({} if streaming else dict(desc=f"tagging {tag}")))
                 for part, tag in zip(parts, tags)]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    if streaming:
        ds = ds.filter(_drop_empty, batched=True)
        if next(iter(ds.take(1)), None) is None:
            raise ValueError(f"no non-empty documents in {sources!r}")
        return ds
    total = len(ds)
    ds = ds.filter(_drop_empty, batched=True, num_proc=num_proc if num_proc and num_proc > 1 else None,
                   desc="dropping empty documents")
    if len(ds) == 0:
        raise ValueError(f"no non-empty documents in {sources!r} ({total} rows, all empty)")
    if len(ds) < total:
        logger.warning("skipped %d empty documents of %d in %r", total - len(ds), total, sources)
    return ds


def source_name(path):
    """'../data/linux_doc_rst.parquet' -> 'linux_doc_rst' (the key of data.weights); hub 'user/set' -> 'set'."""
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def apply_source_weights(docs, weights, seed=0):
    """Resample documents by source: weight w keeps each document floor(w) times plus once more with
    probability w - floor(w) (seeded); sources missing from `weights` keep weight 1. Copies go in passes
    (every kept document once, then the second copies, ...) so a repeat never lands next to itself in a
    packed block. docs: a Dataset with "text" and "source" (load_text_dataset(with_source=True));
    returns it without the "source" column."""
    sources = np.asarray(docs["source"])
    names = sorted(set(sources.tolist()))
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"data.weights: {unknown} name no source file; the sources are {names}")
    lookup = np.array([float(weights.get(name, 1.0)) for name in names])
    weight = lookup[np.searchsorted(names, sources)]  # (N,) one weight per document
    whole = np.floor(weight)
    copies = whole.astype(np.int64) + (np.random.default_rng(seed).random(len(weight)) < weight - whole)
    if copies.sum() == 0:
        raise ValueError(f"data.weights: {weights} keep no document")
    indices = np.concatenate([np.flatnonzero(copies > k) for k in range(int(copies.max()))])
    for i, name in enumerate(names):
        is_source = sources == name
        logger.info("data.weights: %s x%g: %d -> %d documents", name, lookup[i], is_source.sum(),
                    copies[is_source].sum())
    return docs.select(indices).remove_columns("source")


def load_tokenizer(path):
    """A PreTrainedTokenizerFast from a directory we trained, or any Hugging Face tokenizer directory/name."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.exists(path) and (path.count("/") > 1 or path.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"tokenizer path {path!r} is a file; expected a directory with tokenizer.json")
    if os.path.isdir(path) and not any(
        os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")
    ):
        raise FileNotFoundError(f"{path!r} holds no tokenizer files (tokenizer.json, vocab.txt, ...)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        # transformers reads a tokenizer.json that is not a tokenizer as far as a missing key ('added_tokens'):
        # ask the tokenizers library what is wrong with the file and name it
        problem = tokenizer_file_problem(os.path.join(path, "tokenizer.json"))
        if problem:
            raise ValueError(problem) from None
        if not isinstance(err, (OSError, ValueError)):
            raise
        raise FileNotFoundError(f"tokenizer {path!r}: neither a local directory nor a loadable hub tokenizer "
                                f"({str(err).splitlines()[0]})") from None  # a hub name unreachable / unknown
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{path!r} loaded a slow tokenizer ({type(tokenizer).__name__}); expected a fast one")
    return tokenizer


def tokenizer_file_problem(file) -> str | None:
    """One line saying why `file` (a tokenizer.json) is not a tokenizer the tokenizers library loads; None
    when it loads or is absent."""
    from tokenizers import Tokenizer

    if not os.path.isfile(file):
        return None
    try:
        Tokenizer.from_file(file)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        return (f"{file}: not a tokenizer ({(str(err) or type(err).__name__).splitlines()[0]}); "
                "expected the tokenizer.json of a fast tokenizer, as `textjepa tokenizer train` or "
                "save_pretrained writes it")
    return None


def separator_token_id(tokenizer):
    """The id placed between packed documents: eos (</s>) if the tokenizer has one, else sep ([SEP])."""
    for name in ("eos_token_id", "sep_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return token_id
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither an eos nor a sep token to separate documents")


def roberta_position_offset(pad_token_id) -> int:
    """RoBERTa numbers positions from padding_idx + 1: a position table of P rows holds P - offset tokens."""
    return (pad_token_id or 0) + 1


def check_block_size(block_size, max_position_embeddings):
    """Fail early when blocks would not fit the model's position table."""
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    if block_size > max_position_embeddings:
        raise ValueError(
            f"block_size={block_size} is longer than the model's max_position_embeddings="
            f"{max_position_embeddings}; lower data.block_size or raise model.max_position_embeddings"
        )
    return block_size


def _tokenize_and_pack(batch, indices, backend, sep_id, block_size):
    """Documents -> concatenated ids (each followed by sep) -> rows of exactly block_size ids.

    first_document (per row) is the position, in the packed dataset of documents, of the document its first
    token belongs to: the document pieces of a row, cut at separators, are documents first_document,
    first_document + 1, ... (a piece running on from the row before shares its document number with that
    row's last piece). Pooled objectives read it to tell two pieces of one document from two documents.
    The unfilled tail of each map batch is dropped and counted in "dropped" (stored on the batch's first
    row). A batch too small to fill one block yields a single placeholder row (is_block=False) so that
    its tokens are still counted; pack_dataset removes placeholders."""
    encodings = backend.encode_batch(batch["text"], add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    for e, end, n in zip(encodings, ends, lengths):
        ids[end - n:end - 1] = e.ids
    ids[ends - 1] = sep_id
    num_blocks = len(ids) // block_size
    dropped = len(ids) - num_blocks * block_size
    if num_blocks == 0:
        return {"input_ids": [[]], "first_document": [-1], "dropped": [dropped], "is_block": [False]}
    blocks = ids[: num_blocks * block_size].reshape(num_blocks, block_size)
    # the document holding token b * block_size: the first whose end (one past its separator) lies beyond it
    first_document = indices[0] + np.searchsorted(ends, np.arange(num_blocks) * block_size, side="right")
    dropped_col = np.zeros(num_blocks, dtype=np.int64)
    dropped_col[0] = dropped
    return {"input_ids": blocks, "first_document": first_document, "dropped": dropped_col,
            "is_block": np.ones(num_blocks, dtype=bool)}


def _whole_text_backend(tokenizer):
    """The fast tokenizer's backend without the padding and truncation a tokenizer.json may carry (a saved
    sentence-transformers model's pads every text to 128 ids): packing needs each document's ids, all of them."""
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    if backend.padding is None and backend.truncation is None:
        return backend
    backend = Tokenizer.from_str(backend.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def pack_dataset(docs, tokenizer, block_size, num_proc=1, streaming=False, desc="tokenize+pack"):
    """Tokenize a "text" dataset and pack it into blocks of block_size ids (see _tokenize_and_pack)."""
    import datasets

    fn_kwargs = dict(backend=_whole_text_backend(tokenizer), sep_id=separator_token_id(tokenizer), block_size=block_size)
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "first_document": datasets.Value("int64"),
        "dropped": datasets.Value("int64"),
        "is_block": datasets.Value("bool"),
    })
    map_kwargs = dict(batched=True, with_indices=True, batch_size=PACK_BATCH_DOCS, fn_kwargs=fn_kwargs,
                      remove_columns=["text"], features=features)
    if streaming:
        packed = docs.map(_tokenize_and_pack, **map_kwargs)
        packed = packed.filter(lambda flags: flags, input_columns=["is_block"], batched=True)
        return packed.remove_columns(["dropped", "is_block"])
    packed = docs.map(_tokenize_and_pack, num_proc=num_proc if num_proc and num_proc > 1 else None, desc=desc,
                      **map_kwargs)
    stats = packed.select_columns(["dropped", "is_block"]).with_format("numpy")[:]
    dropped, is_block = int(stats["dropped"].sum()), stats["is_block"]
    if not is_block.all():  # rare: only batches with fewer than block_size tokens make placeholders
        packed = packed.select(np.flatnonzero(is_block)).flatten_indices()
    packed = packed.remove_columns(["dropped", "is_block"])
    if len(packed) == 0:
        raise ValueError(
            f"{desc}: the corpus holds {dropped} tokens, fewer than one block of block_size={block_size}; "
            "lower block_size or add text"
        )
    kept = len(packed) * block_size
    logger.info("%s: %d blocks of %d tokens (%d tokens kept, %d tail tokens dropped = %.2f%%)", desc, len(packed),
                block_size, kept, dropped, 100.0 * dropped / max(1, kept + dropped))
    packed.info.description = f"packed {kept} tokens in blocks of {block_size}; dropped {dropped} tail tokens"
    return packed


def _held_out(batch, every, held_out):
    """The streaming validation split: a document is held out when the crc32 of its text is 0 modulo
    `every` (about 1 in `every`). A position rule (every n-th document) would move with the order the
    files are read in, which a shuffled stream changes every epoch: documents would cross the split."""
    return [(zlib.crc32(text.encode("utf-8")) % every == 0) == held_out for text in batch["text"]]


def build_pretraining_datasets(sources, tokenizer, block_size, text_column="text", validation_fraction=0.01,
                               validation_files=None, num_proc=1, cache_dir=None, streaming=False, seed=0,
                               txt_mode="paragraph", encoding_errors=None, source_weights=None):
    """(train, valid): packed "input_ids" blocks of exactly block_size tokens.

    The validation split is held out at document level before packing, so no document straddles the
    splits: either the files in validation_files, or a validation_fraction of documents (a seeded random
    split; when streaming, the documents whose text hashes to 0 modulo round(1/fraction), see _held_out).
    valid is None when the fraction is 0.
    source_weights ({file name without extension: weight}) resamples the training documents after the split
    (apply_source_weights); validation keeps the natural mixture.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    if source_weights is not None and streaming:
        raise ValueError("data.weights: not supported with streaming yet; unset one of them")
    docs = load_text_dataset(sources, text_column=text_column, txt_mode=txt_mode, streaming=streaming,
                             cache_dir=cache_dir, encoding_errors=encoding_errors, num_proc=num_proc,
                             with_source=source_weights is not None)
    if validation_files:
        train_docs = docs
        valid_docs = load_text_dataset(validation_files, text_column=text_column, txt_mode=txt_mode,
                                       streaming=streaming, cache_dir=cache_dir, encoding_errors=encoding_errors)
    elif validation_fraction and validation_fraction > 0:
        if not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
        if streaming:  # by content, not position: shuffling reorders the files every epoch (see _held_out)
            every = max(2, round(1 / validation_fraction))
            valid_docs = docs.filter(_held_out, batched=True, fn_kwargs=dict(every=every, held_out=True))
            train_docs = docs.filter(_held_out, batched=True, fn_kwargs=dict(every=every, held_out=False))
        else:
            if len(docs) < 2:
                raise ValueError(f"cannot hold out a validation split from {len(docs)} document(s) in {sources!r}")
            split = docs.train_test_split(test_size=validation_fraction, seed=seed)
            train_docs, valid_docs = split["train"], split["test"]
    else:
        train_docs, valid_docs = docs, None

    if source_weights is not None:
        train_docs = apply_source_weights(train_docs, source_weights, seed)
        if valid_docs is not None and "source" in valid_docs.column_names:
            valid_docs = valid_docs.remove_columns("source")
    train = pack_dataset(train_docs, tokenizer, block_size, num_proc, streaming, desc="train: tokenize+pack")
    valid = None
    if valid_docs is not None:
        try:
            valid = pack_dataset(valid_docs, tokenizer, block_size, num_proc, streaming, desc="valid: tokenize+pack")
        except ValueError as err:
            if validation_files:
                raise
            raise ValueError(f"{err}; the validation split is validation_fraction={validation_fraction} of the "
                             "documents: raise data.validation_fraction (or set it to 0 for no validation split)"
                             ) from None
    return train, valid
