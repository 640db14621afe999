"""Diagnostic only (docs/adapt.md, fifth round): which side moved? nDCG@10 on validation with queries and documents
encoded by different models. python docs/adapt_round5/cross_encoding.py RETRIEVAL_DIR START_DIR ADAPTED_DIR"""
import sys, json, torch
from textjepa.embedding.encoder import SentenceEncoder
from textjepa.evaluation.retrieval import load_beir, validation_test_qrels, search
from textjepa.evaluation.metrics import retrieval_metrics
data, start_dir, adapted_dir = sys.argv[1:4]
corpus, queries, qrels = load_beir(data)
val = validation_test_qrels(data, qrels)["validation"]
doc_ids = list(corpus); qids = list(val)
emb = {}
for name, path in (("start", start_dir), ("adapted", adapted_dir)):
    enc = SentenceEncoder(path)
    emb[name] = (enc.encode([queries[q] for q in qids], convert_to_tensor=True),
                 enc.encode([corpus[d] for d in doc_ids], convert_to_tensor=True))
out = {}
for qn in emb:
    for dn in emb:
        _, top = search(emb[qn][0], emb[dn][1], 10)
        rankings = {q: [doc_ids[i] for i in row] for q, row in zip(qids, top.tolist())}
        out[f"queries {qn} / documents {dn}"] = round(100 * retrieval_metrics(rankings, val)["ndcg_at_10"], 2)
out["cos(start, adapted) queries"] = round(torch.nn.functional.cosine_similarity(emb["start"][0], emb["adapted"][0]).mean().item(), 3)
out["cos(start, adapted) documents"] = round(torch.nn.functional.cosine_similarity(emb["start"][1], emb["adapted"][1]).mean().item(), 3)
print(json.dumps(out, indent=1))
