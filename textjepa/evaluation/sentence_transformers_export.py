"""Export an encoder directory as a sentence-transformers model (Transformer -> Pooling [-> Normalize]).

    from textjepa.evaluation import export_sentence_transformer
    export_sentence_transformer("runs/x/export", "runs/x/st", pooling="mean", normalize=True)
    SentenceTransformer("runs/x/st").encode(texts)   # == SentenceEncoder("runs/x/export").encode(texts)

sentence-transformers writes its own modules.json / config files through `save`. For a textjepa
model, `import textjepa` before loading (it registers the Auto classes), or export the encoder with
`auto_map=True` and load with `trust_remote_code=True`.
"""

import argparse

import textjepa  # noqa: F401  registers textjepa's AutoConfig / AutoModel for sentence-transformers' loader
from textjepa.evaluation.embedding import default_max_length


def export_sentence_transformer(model_dir, output_dir, pooling="mean", normalize=True, max_seq_length=None):
    try:  # sentence-transformers >= 6 keeps the modules here; older versions under sentence_transformers.models
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling={pooling!r}; expected 'mean' or 'cls'")
    if max_seq_length is None:  # the same length SentenceEncoder uses, so both give equal embeddings
        from transformers import AutoConfig, AutoTokenizer

        max_seq_length = default_max_length(AutoConfig.from_pretrained(str(model_dir)),
                                            AutoTokenizer.from_pretrained(str(model_dir)), model_dir)
    transformer = Transformer(str(model_dir), max_seq_length=max_seq_length)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(output_dir))
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description="export an encoder directory as a SentenceTransformer directory")
    p.add_argument("model_dir")
    p.add_argument("output_dir")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    p.add_argument("--no-normalize", dest="normalize", action="store_false")
    p.add_argument("--max-seq-length", type=int, default=None)
    args = p.parse_args(argv)
    export_sentence_transformer(args.model_dir, args.output_dir, args.pooling, args.normalize, args.max_seq_length)
    print(f"SentenceTransformer written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
