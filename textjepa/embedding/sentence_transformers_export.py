"""The sentence-transformers layout of an encoder directory: Transformer -> Pooling [-> Dense] [-> Normalize].

Every textjepa export carries it (`textjepa export`, the trainer's export), so

    SentenceTransformer("runs/x/export", trust_remote_code=True).encode(texts)
    # == SentenceEncoder("runs/x/export").encode(texts)

also where textjepa is not installed. The files are written by hand (sentence-transformers is not a
dependency of textjepa) in the format sentence-transformers 3 to 6 read:

    modules.json                       the pipeline below
    sentence_bert_config.json          max_seq_length: the length SentenceEncoder truncates to
    config_sentence_transformers.json  similarity: cosine
    0_WordWeights/config.json          only when token_weights.safetensors is shipped (SIF): each token's
                                       state times its weight; Pooling then divides by the weights' sum,
                                       i.e. the weighted mean SentenceEncoder computes
    1_Pooling/config.json              mean (or cls) pooling over the real tokens
    2_Dense/                           only when whitening.safetensors is shipped: an identity-activation
                                       Linear with weight matrix^T and bias -mean @ matrix, i.e.
                                       (x - mean) @ matrix, as SentenceEncoder applies it before normalising
    3_Normalize/                       L2 normalisation

`write_sentence_transformers_layout(dir)` (re)writes it in place, one file at a time through a temporary
name, modules.json last; `ship_whitening` (encoder.py) calls it so the WordWeights and Dense modules
always match the shipped post-processing. `export_sentence_transformer(model_dir, out_dir)` writes a copy of any
encoder directory (a BERT too) with the layout.
"""

import argparse
import json
import os
import shutil

import numpy as np

MODULES_FILE = "modules.json"
WORD_WEIGHTS_DIR = "0_WordWeights"
DENSE_DIR = "2_Dense"
TYPES = {  # the names every sentence-transformers version since 2 resolves (6 maps them to its new paths)
    "transformer": "sentence_transformers.models.Transformer",
    "word_weights": "sentence_transformers.models.WordWeights",
    "pooling": "sentence_transformers.models.Pooling",
    "dense": "sentence_transformers.models.Dense",
    "normalize": "sentence_transformers.models.Normalize",
}


def _write_json(path, data):
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def has_sentence_transformers_layout(model_dir):
    return os.path.isfile(os.path.join(str(model_dir), MODULES_FILE))


def _layout_settings(model_dir):
    """(pooling, normalize, max_seq_length) of an existing layout, or None when there is none."""
    model_dir = str(model_dir)
    if not has_sentence_transformers_layout(model_dir):
        return None
    modules = _read_json(os.path.join(model_dir, MODULES_FILE))
    pooling, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            config = _read_json(os.path.join(model_dir, module["path"], "config.json"))
            pooling = "cls" if config.get("pooling_mode_cls_token") or config.get("pooling_mode") == "cls" else "mean"
        elif kind.endswith("Normalize"):
            normalize = True
    max_seq_length = None
    sbert = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(sbert):
        max_seq_length = _read_json(sbert).get("max_seq_length")
    return pooling, normalize, max_seq_length


def _default_max_seq_length(model_dir):
    from transformers import AutoConfig, AutoTokenizer

    import textjepa  # noqa: F401  registers the textjepa config class
    from textjepa.embedding.model_dir import default_max_length

    config = AutoConfig.from_pretrained(model_dir)
    return default_max_length(config, AutoTokenizer.from_pretrained(model_dir))


def write_sentence_transformers_layout(model_dir, pooling=None, normalize=None, max_seq_length=None,
                                       hidden_size=None):
    """Write modules.json, sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/,
    2_Dense/ (when model_dir holds whitening.safetensors) and 3_Normalize/ into model_dir.

    Unset arguments keep what an existing layout says, else: mean pooling, normalised, max_seq_length
    as SentenceEncoder picks it (tokenizer limit, position table, 512), hidden_size from config.json."""
    from textjepa.embedding.postprocessing import load_token_weights, load_whitening

    model_dir = str(model_dir)
    existing = _layout_settings(model_dir) or ("mean", True, None)
    pooling = pooling or existing[0]
    normalize = existing[1] if normalize is None else normalize
    max_seq_length = max_seq_length or existing[2] or _default_max_seq_length(model_dir)
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling={pooling!r}; expected 'mean' or 'cls'")
    if hidden_size is None:
        hidden_size = int(_read_json(os.path.join(model_dir, "config.json"))["hidden_size"])
    whitening = load_whitening(model_dir)

    _write_json(os.path.join(model_dir, "sentence_bert_config.json"),
                {"max_seq_length": int(max_seq_length), "do_lower_case": False})
    _write_json(os.path.join(model_dir, "config_sentence_transformers.json"),
                {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    os.makedirs(os.path.join(model_dir, "1_Pooling"), exist_ok=True)
    _write_json(os.path.join(model_dir, "1_Pooling", "config.json"), {
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True})
    modules = [{"idx": 0, "name": "0", "path": "", "type": TYPES["transformer"]}]
    token_weights = load_token_weights(model_dir)
    if token_weights is not None:  # sentence-transformers' WordWeights keys them by token string
        from transformers import AutoTokenizer

        tokens = AutoTokenizer.from_pretrained(model_dir).convert_ids_to_tokens(list(range(len(token_weights))))
        os.makedirs(os.path.join(model_dir, WORD_WEIGHTS_DIR), exist_ok=True)
        _write_json(os.path.join(model_dir, WORD_WEIGHTS_DIR, "config.json"), {
            "vocab": tokens, "word_weights": {t: float(w) for t, w in zip(tokens, token_weights)},
            "unknown_word_weight": 1.0})
        modules.append({"idx": 1, "name": "1", "path": WORD_WEIGHTS_DIR, "type": TYPES["word_weights"]})
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": "1_Pooling", "type": TYPES["pooling"]})
    if whitening is not None:
        from safetensors.numpy import save_file

        mean, matrix = (np.asarray(a, dtype=np.float64) for a in whitening)
        os.makedirs(os.path.join(model_dir, DENSE_DIR), exist_ok=True)
        _write_json(os.path.join(model_dir, DENSE_DIR, "config.json"), {
            "in_features": hidden_size, "out_features": int(matrix.shape[1]), "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity"})
        weights = os.path.join(model_dir, DENSE_DIR, "model.safetensors")
        # Linear(x) = x @ W^T + b = (x - mean) @ matrix with W = matrix^T, b = -mean @ matrix
        save_file({"linear.weight": np.ascontiguousarray(matrix.T, dtype=np.float32),
                   "linear.bias": np.ascontiguousarray(-(mean @ matrix), dtype=np.float32)}, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": DENSE_DIR, "type": TYPES["dense"]})
    if normalize:
        os.makedirs(os.path.join(model_dir, "3_Normalize"), exist_ok=True)
        _write_json(os.path.join(model_dir, "3_Normalize", "config.json"), {})
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": "3_Normalize",
                        "type": TYPES["normalize"]})
    _write_json(os.path.join(model_dir, MODULES_FILE), modules)
    if whitening is None:
        shutil.rmtree(os.path.join(model_dir, DENSE_DIR), ignore_errors=True)
    if token_weights is None:
        shutil.rmtree(os.path.join(model_dir, WORD_WEIGHTS_DIR), ignore_errors=True)
    if not normalize:
        shutil.rmtree(os.path.join(model_dir, "3_Normalize"), ignore_errors=True)
    return model_dir


def export_sentence_transformer(model_dir, output_dir, pooling="mean", normalize=True, max_seq_length=None):
    """Copy an encoder directory to output_dir with the sentence-transformers layout (whitening included);
    written beside output_dir and renamed into place. Returns output_dir."""
    from textjepa.embedding.model_dir import check_model_dir

    source = check_model_dir(model_dir)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{model_dir}: expected a local encoder directory")
    output_dir = os.path.abspath(str(output_dir))
    max_seq_length = max_seq_length or _default_max_seq_length(source)
    temporary = os.path.join(os.path.dirname(output_dir), f".tmp-st-{os.path.basename(output_dir)}")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary)
    for shipped in ("whitening.safetensors", "token_weights.safetensors"):
        if source != str(model_dir) and os.path.isfile(os.path.join(str(model_dir), shipped)):
            shutil.copyfile(os.path.join(str(model_dir), shipped), os.path.join(temporary, shipped))
    for stale in (MODULES_FILE, WORD_WEIGHTS_DIR, DENSE_DIR, "1_Pooling", "3_Normalize"):  # a copied layout is rewritten
        path = os.path.join(temporary, stale)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
    write_sentence_transformers_layout(temporary, pooling=pooling, normalize=normalize, max_seq_length=max_seq_length)
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.replace(temporary, output_dir)
    return output_dir


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
