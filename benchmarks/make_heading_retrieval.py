"""A held-out retrieval domain in BEIR layout from reStructuredText documentation: heading -> section.

    python benchmarks/make_heading_retrieval.py --source ../shared/data/pretrain/python_doc_rst.parquet \
        --out runs/heading_retrieval/python_doc [--max-queries 2000] [--max-words 120] [--seed 0]

The parquet (columns `text`, `source`) holds the documentation as consecutive blank-line-separated blocks in
file order, so its rows are joined back into one line stream and cut into sections at reStructuredText
headings: a title line followed by an underline of one repeated punctuation character (= - ~ ^ * # " ...) at
least as long as the title, with an optional overline of the same character; a section runs to the next
heading of any level. For each section:
  query    the heading, rst markup stripped (``code`` / :role:`x` / `link <url>`_ / *emphasis* -> their
           text, trailing colons dropped);
  passage  the section body without the heading, minus explicit-markup blocks that carry no prose (link
           targets, comments, substitutions, index / toctree / author directives and their indented
           content), whitespace-normalised and cut to its first --max-words words.
Kept passages: body of at least --min-body-words words. Kept queries: a kept passage's heading with at least
--min-heading-words words that occurs once in the whole file (a heading that recurs, e.g. "Module
contents", has no single right answer). Identical passages are merged into one document (every query whose
passage it is judges it relevant). A seeded sample of --max-queries queries is judged; the corpus holds
every kept passage, including those of sections whose heading was not kept as a query, so retrieval
searches the whole section collection. Passages often contain their heading words (lexical overlap is
ordinary in BEIR); dataset.json counts how many contain the exact heading string.

Writes OUT/corpus.jsonl (_id, title "", text), OUT/queries.jsonl (_id, text), OUT/qrels/test.tsv
(query-id corpus-id score, score 1) and OUT/dataset.json. It loads with textjepa.evaluation.retrieval.load_beir;
validation_test_qrels splits the judged queries into fixed validation / test halves. A domain-adaptation
method trains on corpus.jsonl only, never on queries or judgements.
"""

import argparse
import json
import os
import re
import shlex
import sys
from collections import Counter

import numpy as np
import pandas as pd

PUNCTUATION = r"!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~"  # rst allows any of these as an adornment
ADORNMENT = re.compile(rf"^([{PUNCTUATION}])\1+\s*$")  # a line of one repeated punctuation character
DROPPED_DIRECTIVES = {"index", "toctree", "highlight", "sectionauthor", "moduleauthor", "codeauthor",
                      "currentmodule", "testsetup", "testcleanup", "include", "only", "raw"}
DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::")


def read_lines(path):
    """The parquet's rows in order, joined back into the lines of one text (blocks separated by a blank line)."""
    texts = pd.read_parquet(path, columns=["text"])["text"].tolist()
    return "\n\n".join(texts).split("\n"), len(texts)


def _adornment(line):
    match = ADORNMENT.match(line)
    return match.group(1) if match else None


def _heading_at(lines, i):
    """Is lines[i] a heading's title? 1: with an overline (lines[i - 1]), 0: underline only, None: no.
    The underline is lines[i + 1] either way."""
    title = lines[i]
    if not re.search(r"\w", title) or i + 1 >= len(lines):
        return None
    char = _adornment(lines[i + 1])
    if char is None or len(lines[i + 1].rstrip()) < len(title.strip()):
        return None
    before_blank = lambda j: j < 0 or not lines[j].strip()  # noqa: E731
    if i >= 1 and _adornment(lines[i - 1]) == char and len(lines[i - 1].rstrip()) == len(lines[i + 1].rstrip()) \
            and before_blank(i - 2):
        return 1  # overline + title (may be indented) + underline
    if not title[0].isspace() and before_blank(i - 1):
        return 0  # title + underline
    return None


def split_sections(lines):
    """[(raw heading title, body lines)] in order; text before the first heading is dropped."""
    sections, title, body, i = [], None, [], 0
    while i < len(lines):
        overline = _heading_at(lines, i)
        if overline is not None:
            if title is not None:
                sections.append((title, body))
            if overline and body:
                body.pop()  # the overline was appended to the previous section's body
            title, body, i = lines[i].strip(), [], i + 2
            continue
        body.append(lines[i])
        i += 1
    if title is not None:
        sections.append((title, body))
    return sections


def clean_heading(title):
    """rst markup -> plain text: ':func:`~os.open`' -> 'os.open', '``x``' -> 'x', '`text <url>`_' -> 'text'."""
    text = re.sub(r":[\w:+-]+:`[~!.]*([^`]*)`", r"`\1`", title)           # :role:`~x` -> `x`
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`_{0,2}", r"\1", text)           # `text <target>`_ / :ref:`text <t>`
    text = re.sub(r"``([^`]*)``", r"\1", text)                            # ``code``
    text = re.sub(r"`([^`]*)`_{0,2}", r"\1", text)                        # `x`, `x`_
    text = re.sub(r"\|([\w .-]+)\|_{0,2}", r"\1", text)                   # |substitution|
    text = re.sub(r"\*\*([^*]+)\*\*|(?<!\\)\*([^*\s][^*]*)(?<![\s\\])\*",       # **strong**, *emphasis*
                  lambda m: m.group(1) or m.group(2), text)
    text = re.sub(r"\\(.?)", lambda m: "" if m.group(1) in (" ", "") else m.group(1), text)  # rst escapes
    text = re.sub(r"\s+-{2,3}\s+", " \u2014 ", text)                      # ' --- ' -> em dash
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(":").strip()


def clean_body(body_lines):
    """Section body lines -> normalised prose: blocks that are link targets, comments, substitutions or
    metadata directives (and the indented blocks that continue them) are dropped."""
    blocks = re.split(r"\n\s*\n", "\n".join(body_lines))
    kept, dropping = [], False
    for block in blocks:
        if not block.strip():
            continue
        if dropping and block[0].isspace():
            continue  # indented content of a dropped directive / comment
        first = block.lstrip("\n").split("\n", 1)[0]
        directive = DIRECTIVE.match(first)
        # a comment, `.. _target:`, `.. |substitution| ...` (no plain directive name) or a metadata directive
        dropping = first.startswith("..") and (directive is None or directive.group(1) in DROPPED_DIRECTIVES)
        if not dropping:
            kept.append(block)
    return " ".join(" ".join(kept).split())


def _words(text):
    return [w for w in text.split() if re.search(r"\w", w)]


def build(lines, max_queries, max_words, min_body_words, min_heading_words, seed):
    """-> (corpus [text], queries [(heading, corpus index)] sampled, counts {})."""
    sections = [(clean_heading(title), clean_body(body)) for title, body in split_sections(lines)]
    heading_counts = Counter(heading.lower() for heading, _ in sections)
    corpus, index_of, candidates = [], {}, []
    counts = Counter(sections=len(sections))
    for heading, body in sections:
        if len(body.split()) < min_body_words:
            counts["dropped_short_body"] += 1
            continue
        passage = " ".join(body.split()[:max_words])
        if passage not in index_of:
            index_of[passage] = len(corpus)
            corpus.append(passage)
        else:
            counts["merged_duplicate_passages"] += 1
        if len(_words(heading)) < min_heading_words:
            counts["no_query_short_heading"] += 1
        elif heading_counts[heading.lower()] > 1:
            counts["no_query_repeated_heading"] += 1
        else:
            candidates.append((heading, index_of[passage]))
    counts["query_candidates"] = len(candidates)
    order = np.random.default_rng(seed).permutation(len(candidates))[:max_queries]
    queries = [candidates[i] for i in sorted(order)]  # file order
    counts["queries"], counts["corpus"] = len(queries), len(corpus)
    counts["queries_sharing_a_passage"] = sum(n - 1 for n in Counter(d for _, d in queries).values() if n > 1)
    counts["passages_with_exact_heading"] = sum(h in corpus[d] for h, d in queries)
    counts["passages_with_heading_ignoring_case"] = sum(h.lower() in corpus[d].lower() for h, d in queries)
    lengths = [len(corpus[d].split()) for _, d in queries]
    counts["judged_passage_words_mean"] = round(float(np.mean(lengths)), 1)
    counts["query_words_mean"] = round(float(np.mean([len(h.split()) for h, _ in queries])), 2)
    return corpus, queries, dict(counts)


def write(out, corpus, queries, info):
    os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for i, text in enumerate(corpus):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "queries.jsonl"), "w", encoding="utf-8") as f:
        for i, (heading, _) in enumerate(queries):
            f.write(json.dumps({"_id": f"q{i}", "text": heading}, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i, (_, doc) in enumerate(queries):
            f.write(f"q{i}\td{doc}\t1\n")
    with open(os.path.join(out, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="../shared/data/pretrain/python_doc_rst.parquet",
                   help="a pretrain/ parquet of reStructuredText (python_doc_rst or linux_doc_rst)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-queries", type=int, default=2000)
    p.add_argument("--max-words", type=int, default=120, help="passage = the body's first N words")
    p.add_argument("--min-body-words", type=int, default=20)
    p.add_argument("--min-heading-words", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    lines, rows = read_lines(args.source)
    corpus, queries, counts = build(lines, args.max_queries, args.max_words, args.min_body_words,
                                    args.min_heading_words, args.seed)
    name = os.path.splitext(os.path.basename(args.source))[0]
    info = {
        "task": "section heading -> section passage",
        "metric": "ndcg_at_10",
        "source": f"{name} ({os.path.basename(args.source)}, {rows} rows): reStructuredText documentation "
                  "from the offline pretrain/ set",
        "queries": len(queries),
        "corpus": len(corpus),
        "construction": (
            "rows joined in order and cut at rst headings (title + underline of one repeated punctuation "
            "character at least as long, optional overline); query = heading with rst markup and trailing "
            f"colons stripped; passage = section body without heading, link targets / comments / metadata "
            f"directives dropped, whitespace-normalised, first {args.max_words} words; passages need "
            f">= {args.min_body_words} body words; queries need >= {args.min_heading_words} heading words "
            "and a heading that occurs once in the file; identical passages merged; corpus = every kept "
            f"passage; {args.max_queries} queries sampled with seed {args.seed}; one relevant passage per "
            "query (score 1). Judgements are test only: validation_test_qrels halves them. Train adaptation "
            "on corpus.jsonl only."),
        "counts": counts,
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (sys.argv[1:] if argv is None
                                                                                else list(argv))),
    }
    write(args.out, corpus, queries, info)
    print(json.dumps(counts, indent=1))
    return info


if __name__ == "__main__":
    main()
