"""Sentence embeddings from any encoder that `transformers.AutoModel` loads.

    from textjepa.evaluation import SentenceEncoder
    encoder = SentenceEncoder("path/to/export")            # AutoModel + AutoTokenizer
    vectors = encoder.encode(["a sentence", "another"])    # (2, H) float32, L2-normalised, mean-pooled

`encode()` tokenizes every text once up front (fast tokenizers batch this in Rust), sorts by token
count so each batch pads to nearly its own length, runs the model under `torch.inference_mode`,
pools with the project's masked pooling (`textjepa.pool_hidden_states`) and restores input order.
"""

import os
from contextlib import nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

from textjepa import pool_hidden_states  # importing textjepa registers its Auto classes
from textjepa.embedding.model_dir import check_model_dir, default_max_length
from textjepa.embedding.postprocessing import (
    TOKEN_WEIGHTS,
    TOKEN_WEIGHTS_FILE,
    WHITENING_FILE,
    apply_whitening,
    fit_sif_weights,
    fit_whitening,
    load_token_weights,
    load_whitening,
    read_unlabeled_texts,
    save_token_weights,
    save_whitening,
)

POOLINGS = ("mean", "cls")


def encode(model, tokenizer, texts, pooling="mean", normalize=True, batch_size=64, max_length=None, device=None,
           show_progress=True, dtype=None, convert_to_tensor=False, token_weights=None):
    """Embed `texts` -> (N, H) float32 np.ndarray (or torch tensor on CPU with convert_to_tensor=True).

    pooling: "mean" (masked mean over real tokens) or "cls" (first token).
    token_weights: (V,) weights per token id (e.g. SIF): "mean" becomes the weighted mean.
    dtype: compute dtype via autocast (e.g. torch.bfloat16); None keeps the model's own dtype.
    """
    if token_weights is not None and pooling != "mean":
        raise ValueError(f"encode: token_weights apply to mean pooling, not pooling={pooling!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"encode: pooling={pooling!r}; expected one of {POOLINGS}")
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"encode: texts[{i}] is {type(text).__name__}, expected str")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if next(model.parameters()).device != device:
        model.to(device)
    max_length = max_length or default_max_length(model.config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway
    model.eval()
    if token_weights is not None:
        token_weights = torch.as_tensor(token_weights, dtype=torch.float32, device=device)

    token_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    order = np.argsort([-len(ids) for ids in token_ids], kind="stable")  # longest first: OOM shows at once
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    pooled_batches = []
    with torch.inference_mode(), autocast:
        for start in tqdm(range(0, len(texts), batch_size), desc="encode", unit="batch", disable=not show_progress):
            rows = order[start:start + batch_size]
            longest = max(len(token_ids[i]) for i in rows)
            input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)  # (B, T), right padded
            attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
            for r, i in enumerate(rows):
                input_ids[r, :len(token_ids[i])] = token_ids[i]
                attention_mask[r, :len(token_ids[i])] = 1
            input_ids = torch.from_numpy(input_ids).to(device)
            attention_mask = torch.from_numpy(attention_mask).to(device)
            output = model(input_ids=input_ids, attention_mask=attention_mask)
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # (B, T, H)
            if hidden.dim() != 3:
                raise ValueError(f"encode: {type(model).__name__} returned {tuple(hidden.shape)}, expected (B, T, H) "
                                 "hidden states; is this an encoder (AutoModel), not a task head?")
            weights = attention_mask if token_weights is None else attention_mask * token_weights[input_ids]  # (B, T)
            pooled = pool_hidden_states(hidden.float(), weights, pooling=pooling)  # (B, H) fp32
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            pooled_batches.append(pooled.cpu())
    if not pooled_batches:
        hidden_size = getattr(model.config, "hidden_size", 0)
        embeddings = torch.empty(0, hidden_size)
    else:
        embeddings = torch.empty_like(torch.cat(pooled_batches))
        embeddings[torch.from_numpy(order)] = torch.cat(pooled_batches)  # back to input order
    return embeddings if convert_to_tensor else embeddings.numpy()


def load_encoder(model_name_or_path, device=None, trust_remote_code=False):
    """AutoModel + AutoTokenizer with errors that say which directory is wrong and how. trust_remote_code is
    transformers' own (a textjepa directory loads without it once textjepa is imported)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = check_model_dir(model_name_or_path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # a broken config.json, an unknown model_type, ...
        raise ValueError(f"{path}: AutoConfig.from_pretrained failed: {type(error).__name__}: {error}") from error
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{path}/config.json: model_type {config.model_type!r} is an encoder-decoder; "
                         "expected an encoder that AutoModel returns hidden states for")
    try:
        model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # RuntimeError (shape mismatch), SafetensorError (truncated file), OSError, ...
        raise ValueError(f"{path}: AutoModel.from_pretrained could not load an encoder "
                         f"(model_type {config.model_type!r}): {type(error).__name__}: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ValueError(f"{path}: no usable tokenizer beside the model (tokenizer.json / tokenizer_config.json): "
                         f"{error}") from error
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(f"{path}: {type(model).__name__} takes no token ids; expected a text encoder")
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


class SentenceEncoder:
    """An encoder directory + pooling settings; `.encode(texts)` gives (N, H) float32 embeddings.

    A directory holding token_weights.safetensors and/or whitening.safetensors (textjepa.evaluation.
    whitening) is used as shipped: mean pooling weighs each token by its weight, and every pooled vector x
    becomes (x - mean) @ matrix before L2 normalisation. cache=True keeps each distinct text's pooled vector
    for the encoder's lifetime, so a text shared by several tasks (or asked for twice) is encoded once.
    """

    def __init__(self, model_name_or_path, pooling="mean", normalize=True, max_length=None, batch_size=64,
                 device=None, dtype=None, cache=False, trust_remote_code=False):
        self.name = str(model_name_or_path)
        self.model, self.tokenizer = load_encoder(model_name_or_path, device, trust_remote_code)
        model_dir = self.name if os.path.isdir(self.name) else None
        self.max_length = max_length or default_max_length(self.model.config, self.tokenizer, model_dir)
        self.pooling, self.normalize, self.batch_size, self.dtype = pooling, normalize, batch_size, dtype
        self.device = next(self.model.parameters()).device
        shipped = load_whitening(model_dir) if model_dir else None
        self.whitening = [shipped] if shipped else []  # [(mean, matrix)], applied in order
        # (V,) weights of the mean pooling, or None; part of the cache key, so copies that differ share it
        self.token_weights = load_token_weights(model_dir, len(self.tokenizer)) if model_dir else None
        self._cache = {} if cache else None  # (pooling, weights id, text) -> raw pooled vector (H,)
        self._check_output()

    def _check_output(self):
        """One tiny forward pass so a directory that is not an encoder fails here, naming itself."""
        if self.whitening and self.whitening[0][0].shape[0] != self.dimension:
            raise ValueError(f"{self.name}/{WHITENING_FILE}: mean has {self.whitening[0][0].shape[0]} dimensions, "
                             f"the model gives {self.dimension}")
        try:
            vector = self.encode(["hello world"], show_progress=False)
        except Exception as error:
            raise ValueError(f"{self.name}: a forward pass on one sentence failed; not a usable encoder: {error}") from error
        if vector.ndim != 2 or vector.shape[0] != 1:
            raise ValueError(f"{self.name}: encode gave shape {vector.shape}, expected (1, H)")

    @property
    def dimension(self):
        return int(self.model.config.hidden_size)

    def _raw(self, texts, batch_size, show_progress, pooling):
        """(N, H) float32 pooled, un-normalised vectors; through the cache when there is one."""
        weights = self.token_weights if pooling == "mean" else None

        def run(batch):
            return encode(self.model, self.tokenizer, batch, pooling=pooling, normalize=False,
                          batch_size=batch_size or self.batch_size, max_length=self.max_length, device=self.device,
                          show_progress=show_progress, dtype=self.dtype, token_weights=weights)
        if self._cache is None:
            return run(texts)
        key = (pooling, None if weights is None else id(weights))
        missing = list(dict.fromkeys(t for t in texts if (*key, t) not in self._cache))
        if missing:
            for text, vector in zip(missing, run(missing)):
                self._cache[(*key, text)] = vector
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._cache[(*key, t)] for t in texts])

    def encode(self, texts, batch_size=None, show_progress=False, convert_to_tensor=False, normalize=None, pooling=None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        vectors = self._raw(texts, batch_size, show_progress, pooling or self.pooling)
        for mean, matrix in self.whitening:
            vectors = apply_whitening(vectors, mean, matrix).astype(np.float32)
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise ValueError(f"{self.name}: non-finite embeddings (NaN/inf) for {int(bad.sum())} of {len(texts)} "
                             f"texts, e.g. {texts[int(np.argmax(bad))][:60]!r}")
        if self.normalize if normalize is None else normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return torch.from_numpy(vectors) if convert_to_tensor else vectors


def encode_distinct(encoder, *text_lists, show_progress=False, **encode_kwargs):
    """One (len(texts), H) array per list in `text_lists` (None stays None); every distinct text across
    all lists is encoded exactly once, by encoder.encode."""
    unique = sorted({text for texts in text_lists if texts is not None for text in texts})
    embeddings = encoder.encode(unique, show_progress=show_progress, **encode_kwargs)  # (U, H)
    row_of = {text: i for i, text in enumerate(unique)}
    return [None if texts is None else embeddings[[row_of[t] for t in texts]] for texts in text_lists]


# ---------------------------------------------------------------- shipped whitening
def post_processed(encoder, texts, token_weights="none"):
    """A copy of `encoder` (sharing its model and cache) with post-processing fitted on `texts`: with
    token_weights="sif", SIF weights counted on them for the mean pooling; then whitening of its pooled
    vectors, on top of whatever whitening the encoder already applies."""
    import copy

    fitted = copy.copy(encoder)
    if token_weights == "sif":
        fitted.token_weights = fit_sif_weights(encoder.tokenizer, texts)
    fitted.whitening = encoder.whitening + [fit_whitening(fitted.encode(texts, normalize=False))]
    return fitted


def ship_whitening(model_dir, source, max_docs=8_800, token_weights="none"):
    """Fit the post-processing on up to max_docs unlabeled texts from `source` and save it in model_dir,
    so every SentenceEncoder (and the suite) uses it as part of the model: with token_weights="sif" the
    SIF weights first, then whitening of the (weighted) mean-pooled vectors. Files already there are
    replaced (the fit always starts from the raw vectors). Returns the whitening file's path."""
    if token_weights not in TOKEN_WEIGHTS:
        raise ValueError(f"token_weights={token_weights!r}; expected one of {TOKEN_WEIGHTS}")
    for name in (WHITENING_FILE, TOKEN_WEIGHTS_FILE):
        if os.path.exists(os.path.join(str(model_dir), name)):
            os.remove(os.path.join(str(model_dir), name))
    fitted = post_processed(SentenceEncoder(str(model_dir)), read_unlabeled_texts(source, max_docs), token_weights)
    if fitted.token_weights is not None:
        save_token_weights(model_dir, fitted.token_weights)
    path = save_whitening(model_dir, *fitted.whitening[-1])
    from textjepa.embedding.sentence_transformers_export import (
        has_sentence_transformers_layout,
        write_sentence_transformers_layout,
    )

    if has_sentence_transformers_layout(model_dir):  # keep SentenceTransformer(model_dir) in step with it
        write_sentence_transformers_layout(model_dir)
    return path


def whiten_main(argv=None):
    """textjepa whiten --model DIR --on FILE_OR_GLOB [--max-docs N] [--token-weights sif|none]: ship the
    post-processing (SIF token weights, whitening) inside a model directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="textjepa whiten", description=whiten_main.__doc__)
    parser.add_argument("--model", required=True, help="encoder directory (an export); whitening.safetensors goes here")
    parser.add_argument("--on", required=True, metavar="FILE_OR_GLOB", help="unlabeled text: txt/jsonl/csv/parquet")
    parser.add_argument("--max-docs", type=int, default=8_800, help="texts sampled evenly across files (500 chars each)")
    parser.add_argument("--token-weights", choices=TOKEN_WEIGHTS, default="sif",
                        help="sif: SIF-weighted mean pooling (token_weights.safetensors), fitted on the same texts")
    args = parser.parse_args(argv)
    print(f"wrote {ship_whitening(args.model, args.on, args.max_docs, args.token_weights)}")
    return 0
