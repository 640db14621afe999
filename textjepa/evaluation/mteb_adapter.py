"""An MTEB encoder: `MtebEncoder(model_dir).encode(sentences, **kwargs) -> np.ndarray`.

    import mteb                                   # optional extra: pip install textjepa[mteb]
    from textjepa.evaluation.mteb_adapter import MtebEncoder
    mteb.evaluate(MtebEncoder("runs/x/export"), mteb.get_tasks(tasks=["STSBenchmark"]))

Satisfies both the classic protocol (a list of strings, keyword arguments such as task_name /
prompt_type / batch_size) and MTEB 2's (an iterable of batches, each a dict with a "text" list).
mteb itself is never imported here.
"""

import numpy as np

from textjepa.evaluation.embedding import SentenceEncoder


class MtebEncoder:
    def __init__(self, model_name_or_path, pooling="mean", normalize=True, batch_size=64, max_length=None, device=None):
        if isinstance(model_name_or_path, SentenceEncoder):
            self.encoder = model_name_or_path
        else:
            self.encoder = SentenceEncoder(model_name_or_path, pooling=pooling, normalize=normalize,
                                           batch_size=batch_size, max_length=max_length, device=device)
        self.normalize = normalize

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

    def encode(self, sentences, *, batch_size=None, show_progress_bar=False, **kwargs):
        """(N, H) float32 array; task_name / prompt_type / task_metadata / hf_split kwargs are accepted and unused."""
        return self.encoder.encode(self._texts(sentences), batch_size=batch_size, show_progress=show_progress_bar)

    def similarity(self, embeddings1, embeddings2):
        """(N, M) cosine similarity."""
        a, b = self._unit(embeddings1), self._unit(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2):
        """(N,) cosine similarity of row i with row i."""
        return (self._unit(embeddings1) * self._unit(embeddings2)).sum(axis=1)

    @staticmethod
    def _unit(x):
        x = np.asarray(x, dtype=np.float32)
        return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
