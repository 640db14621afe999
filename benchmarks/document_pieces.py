"""How much of the sharp uniformity potential on a corpus comes from pairs of pieces of one document.

    python benchmarks/document_pieces.py --start DIR --corpus CORPUS.jsonl [--blocks 1300] [--t 10]

Packing cuts a document longer than a block into pieces in neighbouring blocks; recipes/adapt.yaml reads each
piece on its own (mask.views: documents) and spreads the pieces with exp(-t ||u - v||^2) (model.uniformity_t).
This packs CORPUS as training does, takes the first --blocks blocks in order (so every piece's siblings are
there), embeds every piece with the start (mean pooling over the piece, unit length: what the frozen teacher
and its queue hold) and reports, for the pieces that have a sibling: how often the nearest other piece is a
sibling, and the share of each piece's potential that its siblings make. In training only the siblings that
share its batch or the queue (about 40 batches) count, so these shares are an upper bound.
"""

import argparse
import json

import numpy as np
import torch
from transformers import AutoModel

from textjepa.conversion import read_start
from textjepa.data import build_pretraining_datasets, load_tokenizer, separator_token_id
from textjepa.masking import MaskingConfig, SpanMaskCollator


def piece_embeddings(model, blocks, segments, batch_size=64):
    """(P, H) unit mean-pooled vectors of every piece (segment) of blocks (B, L), read on its own, in order."""
    pieces = [row[seg == s] for row, seg in zip(blocks, segments) for s in range(int(seg.max()) + 1)]
    vectors = []
    with torch.no_grad():
        for i in range(0, len(pieces), batch_size):
            chunk = pieces[i:i + batch_size]
            ids = torch.zeros(len(chunk), max(len(p) for p in chunk), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, piece in enumerate(chunk):
                ids[j, :len(piece)], mask[j, :len(piece)] = torch.as_tensor(piece), 1
            states = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, l, H)
            pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            vectors.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(vectors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", required=True, help="BERT-family or sentence-transformers directory")
    parser.add_argument("--corpus", required=True, help="the domain's text (a BEIR corpus.jsonl works)")
    parser.add_argument("--blocks", type=int, default=1300)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--t", type=float, default=10.0, help="the potential's sharpness (model.uniformity_t)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    start_dir = read_start(args.start).transformer_dir
    tokenizer = load_tokenizer(start_dir)
    train, _ = build_pretraining_datasets([args.corpus], tokenizer, args.block_size, validation_fraction=0.01)
    rows = train.select(range(min(args.blocks, len(train))))
    collator = SpanMaskCollator(MaskingConfig(views="documents", separator_token_id=separator_token_id(tokenizer)))
    batch = collator([{"input_ids": np.asarray(r["input_ids"]), "first_document": r["first_document"]} for r in rows])
    segments, document_ids = batch["segment_ids"].numpy(), batch["document_ids"].numpy()
    documents = torch.as_tensor([d[seg == s][0] for d, seg in zip(document_ids, segments)
                                 for s in range(int(seg.max()) + 1)])  # (P,) the document of each piece
    vectors = piece_embeddings(AutoModel.from_pretrained(start_dir).eval(), batch["input_ids"].numpy(), segments)

    cosine = vectors @ vectors.T
    sibling = documents[:, None] == documents[None, :]
    sibling.fill_diagonal_(False)
    potential = torch.exp(-args.t * (2 - 2 * cosine)).fill_diagonal_(0)
    has_sibling = sibling.any(1)
    nearest = cosine.clone().fill_diagonal_(-2).argmax(1)
    share = (potential * sibling).sum(1) / potential.sum(1)
    report = {
        "corpus": args.corpus, "blocks": len(rows), "pieces": len(documents),
        "documents": int(documents.unique().numel()),
        "pieces_with_a_sibling": round(float(has_sibling.float().mean()), 3),
        "sibling_cosine_mean": round(float(cosine[sibling].mean()), 3),
        "nearest_other_document_cosine_mean": round(float(cosine.masked_fill(sibling, -2).fill_diagonal_(-2)
                                                          .max(1).values[has_sibling].mean()), 3),
        "nearest_piece_is_a_sibling": round(float(sibling[torch.arange(len(documents)), nearest][has_sibling]
                                                  .float().mean()), 3),
        "sibling_share_of_potential_mean": round(float(share[has_sibling].mean()), 3),
        "sibling_share_of_potential_median": round(float(share[has_sibling].median()), 3),
        "sibling_share_of_all_potential": round(float((potential * sibling).sum() / potential.sum()), 3),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
