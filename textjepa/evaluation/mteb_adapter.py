"""An MTEB encoder: `mteb.evaluate(MtebEncoder(model_dir), tasks)` runs any encoder SentenceEncoder loads.

    import mteb                                   # pip install "textjepa[mteb]" (also in the dev extra)
    from textjepa.evaluation.mteb_adapter import MtebEncoder
    mteb.evaluate(MtebEncoder("runs/x/export"), mteb.get_tasks(tasks=["STSBenchmark"]))

MtebEncoder satisfies mteb's `EncoderProtocol` (mteb >= 2): `encode` takes the DataLoader of batches
(dicts with a "text" list) that mteb passes, or a plain list of strings, and the keyword arguments
mteb adds (task_metadata, hf_split, hf_subset, prompt_type, batch_size); `similarity` /
`similarity_pairwise` are cosine; `mteb_model_meta` is a `mteb.ModelMeta` whose loader rebuilds the
encoder (`meta.load_model()`), named "textjepa/<directory name>" with the weights' hash as revision so
mteb's result cache never mixes two models. Vectors are SentenceEncoder's: the same pooling, the
whitening a directory ships, L2 normalisation. mteb is imported only when the metadata is asked for.
"""

import hashlib
import os

import numpy as np

from textjepa.embedding.encoder import SentenceEncoder


def load_mteb_encoder(model_name, revision=None, *, model_path=None, **kwargs):
    """mteb's loader call `loader(name, revision=..., **loader_kwargs)`: the path travels in model_path."""
    return MtebEncoder(model_path or model_name, revision, **kwargs)


def _weights_revision(path):
    """A short content hash of a model directory's config and weights (None for a hub name)."""
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha1()
    for name in ("config.json", "model.safetensors", "whitening.safetensors"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:12]


class MtebEncoder:
    def __init__(self, model_name_or_path, revision=None, *, pooling="mean", normalize=True, batch_size=64,
                 max_length=None, device=None, name=None, **kwargs):
        """model_name_or_path: an encoder directory, a hub name, or a ready SentenceEncoder.
        name: the model name mteb records ("org/model"); default "textjepa/<directory name>"."""
        if isinstance(model_name_or_path, SentenceEncoder):
            self.encoder = model_name_or_path
        else:
            self.encoder = SentenceEncoder(model_name_or_path, pooling=pooling, normalize=normalize,
                                           batch_size=batch_size, max_length=max_length, device=device)
        self.path = self.encoder.name
        self.normalize = normalize
        self.pooling = self.encoder.pooling
        self.revision = revision
        if name is None:
            base = os.path.basename(os.path.normpath(self.path)) or "encoder"
            name = self.path if ("/" in self.path and not os.path.isdir(self.path)) else f"textjepa/{base}"
        self.name = name
        self._meta = None

    @property
    def mteb_model_meta(self):
        """mteb.ModelMeta for this encoder (mteb's loader assigns a copy back here after load_model)."""
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta

            self._meta = ModelMeta(
                loader=load_mteb_encoder,
                loader_kwargs={"model_path": self.path, "pooling": self.pooling, "normalize": self.normalize},
                name=self.name, revision=self.revision or _weights_revision(self.path) or "no_revision_available",
                release_date=None, languages=None,
                n_parameters=sum(p.numel() for p in self.encoder.model.parameters()),
                memory_usage_mb=None, max_tokens=self.encoder.max_length, embed_dim=self.encoder.dimension,
                license=None, open_weights=True, public_training_code=None, public_training_data=None,
                framework=["PyTorch", "Transformers"], similarity_fn_name="cosine", use_instructions=False,
                training_datasets=None,
            )
        return self._meta

    @mteb_model_meta.setter
    def mteb_model_meta(self, meta):
        self._meta = meta

    @staticmethod
    def _texts(inputs):
        """A list of strings, or batches (dicts with "text") as MTEB 2's DataLoader yields them."""
        if isinstance(inputs, str):
            return [inputs]
        texts = []
        for item in inputs:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict) and "text" in item:
                texts.extend([item["text"]] if isinstance(item["text"], str) else list(item["text"]))
            else:
                raise TypeError(f"MtebEncoder.encode: got {type(item).__name__}; expected str or a batch dict with 'text'")
        return texts

    def encode(self, inputs, *, batch_size=None, show_progress_bar=False, **kwargs):
        """(N, H) float32 array; task_metadata / hf_split / hf_subset / prompt_type are accepted and unused."""
        return self.encoder.encode(self._texts(inputs), batch_size=batch_size, show_progress=show_progress_bar)

    def similarity(self, embeddings1, embeddings2):
        """(N, M) cosine similarity."""
        a, b = self._unit(embeddings1), self._unit(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2):
        """(N,) cosine similarity of row i with row i."""
        return (self._unit(embeddings1) * self._unit(embeddings2)).sum(axis=1)

    @staticmethod
    def _unit(x):
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().numpy()
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
