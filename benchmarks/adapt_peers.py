"""The three peer domain-adaptation methods that benchmarks/adapt.py compares ours against, each run through
its own library, behind one class (PeerTrainer: step() on a batch of raw texts, save() a snapshot) so the
driver can give every method the same wall-clock budget and time their steps interleaved.

- "simcse": unsupervised SimCSE (Gao et al. 2021). Each text is its own positive: two forward passes with
  dropout on, in-batch negatives, sentence_transformers' MultipleNegativesRankingLoss(scale=20.0), i.e. the
  paper's temperature 0.05 on cosine similarity.
- "tsdae": TSDAE (Wang et al. 2021) through sentence_transformers' DenoisingAutoEncoderLoss with
  tie_encoder_decoder=True: the encoder embeds the text with 60% of its words deleted (del_ratio=0.6, the
  paper's and DenoisingAutoEncoderDataset.delete's noise), a decoder sharing the encoder's weights
  reconstructs the original text from that one vector via cross-attention.
- "mlm": continued masked-language modelling, transformers' AutoModelForMaskedLM on the start's transformer
  weights with DataCollatorForLanguageModeling(mlm_probability=0.15) (80% [MASK] / 10% random / 10% kept).

All three: AdamW (weight decay 0.01 on matrices only, as textjepa's takes_weight_decay), gradient clipping at
1.0, linear warmup then a constant learning rate (runs are cut by wall clock, so no decay to a step count),
texts truncated to max_length tokens and padded to the longest in the batch. The encoder keeps the start's
pooling and normalisation throughout (also for TSDAE, whose paper uses CLS pooling: one start model, one
pooling, a fair comparison), and save() writes a sentence-transformers directory that is also a plain
transformers BertModel/RobertaModel directory.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from textjepa.optimization import takes_weight_decay
from textjepa.training.checkpoint import replace_directory

PEER_METHODS = ("simcse", "tsdae", "mlm")
SIMCSE_SCALE = 20.0  # 1 / temperature 0.05 (SimCSE paper)
TSDAE_DEL_RATIO = 0.6  # delete 60% of the words, keep 40% (TSDAE paper)
MLM_PROBABILITY = 0.15  # BERT's
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0


def transformer_dir(start_dir) -> Path:
    """The folder with the transformer's config.json, weights and tokenizer: the path of modules.json's
    Transformer entry ("" is the top level), or start_dir itself for a plain transformers directory."""
    start_dir = Path(start_dir)
    modules = start_dir / "modules.json"
    if not modules.exists():
        return start_dir
    for entry in json.loads(modules.read_text()):
        if entry["type"].endswith("Transformer"):
            return start_dir / entry["path"]
    raise ValueError(f"{modules} has no Transformer module")


def load_sentence_transformer(start_dir, device):
    """The start as a SentenceTransformer: its own modules, or a plain BertModel/RobertaModel + mean pooling
    + normalize."""
    from sentence_transformers import SentenceTransformer, models

    if (Path(start_dir) / "modules.json").exists():
        return SentenceTransformer(str(start_dir), device=device)
    transformer = models.Transformer(str(start_dir))
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device=device)


def tsdae_noise():
    """(noise function, name): sentence_transformers' DenoisingAutoEncoderDataset.delete at del_ratio 0.6
    where it can run; it needs nltk and nltk's punkt tokenizer data, which are not project dependencies and
    cannot be downloaded offline, so otherwise the same deletion (each word dropped with probability 0.6,
    at least one kept, numpy's global RNG) on whitespace-separated words."""
    from sentence_transformers.sentence_transformer.datasets import DenoisingAutoEncoderDataset

    def library(text):
        return DenoisingAutoEncoderDataset.delete(text, del_ratio=TSDAE_DEL_RATIO)

    try:
        library("probe the tokenizer data")
        return library, "nltk"
    except (ImportError, LookupError):
        pass

    def whitespace(text):
        words = text.split()
        if not words:
            return text
        keep = np.random.rand(len(words)) > TSDAE_DEL_RATIO
        if not keep.any():
            keep[np.random.choice(len(words))] = True  # at least one word remains, as the library's
        return " ".join(word for word, kept in zip(words, keep) if kept)

    return whitespace, "whitespace"


def adamw(named_parameters, lr):
    """AdamW, weight decay on matrices only (biases and norms get none). Shared (tied) parameters once."""
    decay, no_decay, seen = [], [], set()
    for name, param in named_parameters:
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (decay if takes_weight_decay(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _rng_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, np.random.get_state()


def _set_rng_state(state, device):
    cpu, cuda, numpy_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    np.random.set_state(numpy_state)


class PeerTrainer:
    """method: one of PEER_METHODS. start_dir: a local sentence-transformers directory (modules.json + a
    BERT or RoBERTa transformer, e.g. all-MiniLM-L6-v2) or a plain transformers BertModel/RobertaModel
    directory (then mean pooling + normalize). lr, batch_size, warmup_steps: AdamW (weight decay 0.01),
    linear warmup over warmup_steps then CONSTANT lr (runs are cut by wall clock, so no decay to a step count).
    max_length: token cap per text (default 128; SimCSE paper uses 32 but our passages are longer - use
    the max_length given). device: where training runs (default cpu).

    Each trainer keeps its own torch and numpy random streams (seeded with `seed`), swapped in around
    __init__ and step(), so interleaving several trainers' steps in one process changes no method's dropout,
    masking or noise, and leaves the caller's random state as it was."""

    def __init__(self, method, start_dir, lr=3e-5, batch_size=32, warmup_steps=10, max_length=128, seed=0,
                 device="cpu"):
        if method not in PEER_METHODS:
            raise ValueError(f"method {method!r} is not one of {PEER_METHODS}")
        # batch_size is the driver's to honour: step() trains on whatever batch it is handed.
        self.method, self.batch_size, self.max_length = method, batch_size, max_length
        self.device = torch.device(device)
        self.steps, self.last_loss = 0, float("nan")
        self.text_tokens = 0  # tokens of the last batch's texts, each counted once (step() counts reads)
        caller_rng = _rng_state(self.device)
        torch.manual_seed(seed)  # also seeds the freshly initialised heads below
        np.random.seed(seed)
        try:
            # The sentence-transformers model: trained by SimCSE and TSDAE, the saving shell (on the CPU) for MLM.
            self.model = load_sentence_transformer(start_dir, "cpu" if method == "mlm" else self.device)
            # save() restores the start's length cap: max_length is a training setting, not the model's.
            self.start_max_seq_length = self.model.max_seq_length
            self.model.max_seq_length = max_length
            if method == "simcse":
                from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

                self.loss = MultipleNegativesRankingLoss(self.model, scale=SIMCSE_SCALE)
            elif method == "tsdae":
                self._init_tsdae(start_dir)
            else:
                self._init_mlm(start_dir)
            self.loss.to(self.device)
            self.optimizer = adamw(self.loss.named_parameters(), lr)
            from transformers import get_constant_schedule_with_warmup

            # Note: HF's warmup gives step 0 a learning rate of 0 (then k / warmup_steps).
            self.scheduler = get_constant_schedule_with_warmup(self.optimizer, warmup_steps)
            self._rng = _rng_state(self.device)
        finally:
            _set_rng_state(caller_rng, self.device)

    def _init_tsdae(self, start_dir):
        from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss

        # The loss builds its decoder with AutoModelForCausalLM.from_pretrained(<encoder config's
        # _name_or_path>, is_decoder=True, add_cross_attention=True): point that at the local transformer
        # folder so it never tries the hub (a start saved elsewhere may carry a hub name there). For a BERT
        # that is BertLMHeadModel; its cross-attention and LM-head transform are initialised fresh, and with
        # tie_encoder_decoder every other weight is shared with the encoder (one set of weights trained).
        self.model.transformers_model.config._name_or_path = str(transformer_dir(start_dir))
        self.loss = DenoisingAutoEncoderLoss(self.model, tie_encoder_decoder=True)
        self.noise, self.noise_kind = tsdae_noise()

    def _init_mlm(self, start_dir):
        from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

        # all-MiniLM-L6-v2 ships no MLM head: BertForMaskedLM's transform (dense + LayerNorm) and output bias
        # are initialised fresh, and its output projection is tied to the word embeddings, as the library does.
        self.mlm = AutoModelForMaskedLM.from_pretrained(str(transformer_dir(start_dir)))
        self.tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir(start_dir)))
        self.collator = DataCollatorForLanguageModeling(self.tokenizer, mlm=True, mlm_probability=MLM_PROBABILITY)
        self.loss = self.mlm

    def step(self, texts: list[str]) -> int:
        """One optimizer step on this batch of raw texts; returns the number of non-padding tokens the
        encoder read in this step (for tokens/s): SimCSE reads every text twice (two dropout masks), TSDAE's
        encoder reads the damaged texts (its tied decoder reads the originals, not counted), MLM reads the
        (masked) texts once. self.text_tokens holds the batch's own token count (each text once)."""
        caller_rng = _rng_state(self.device)
        _set_rng_state(self._rng, self.device)
        try:
            self.loss.train()
            if self.method == "mlm":
                loss, read = self._mlm_loss(texts)
            elif self.method == "simcse":
                features = self._features(texts)
                self.text_tokens = int(features["attention_mask"].sum())
                read = 2 * self.text_tokens
                # Two shallow copies: the model writes its outputs into the features dict it is given.
                loss = self.loss([dict(features), dict(features)], None)
            else:
                damaged = self._features([self.noise(text) for text in texts])
                original = self._features(texts)
                read = int(damaged["attention_mask"].sum())
                self.text_tokens = int(original["attention_mask"].sum())
                loss = self.loss([damaged, original], None)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]],
                                           GRAD_CLIP)
            self.optimizer.step()
            self.scheduler.step()
            self.steps += 1
            self.last_loss = float(loss.detach())
            return read
        finally:
            self._rng = _rng_state(self.device)
            _set_rng_state(caller_rng, self.device)

    def _features(self, texts):
        """sentence-transformers' own tokenization (preprocess, which tokenize() now forwards to): truncation
        to max_length, padding to the longest text of the batch."""
        features = self.model.preprocess(texts)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in features.items()}

    def _mlm_loss(self, texts):
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_special_tokens_mask=True)
        batch = self.collator([dict(zip(encoded, values)) for values in zip(*encoded.values())])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.text_tokens = int(batch["attention_mask"].sum())
        return self.mlm(**batch).loss, self.text_tokens

    def save(self, path) -> None:
        """Write a directory that sentence_transformers.SentenceTransformer(path) AND
        transformers.AutoModel.from_pretrained(path) (config.json + model.safetensors at the top level, plus
        tokenizer files) both load, with the start's pooling and normalisation (modules.json, 1_Pooling,
        Normalize), as plain BertModel/RobertaModel (no trust_remote_code). Atomic: written to a temp dir beside
        it, then put in place by checkpoint.replace_directory."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.method == "mlm":
            # The encoder without the MLM head into the start's model; its pooler (unused by mean pooling,
            # absent from *ForMaskedLM) stays the start's, so the saved BertModel is complete.
            missing, unexpected = self.model.transformers_model.load_state_dict(self.mlm.base_model.state_dict(),
                                                                                strict=False)
            assert not unexpected and all(key.startswith("pooler.") for key in missing), (missing, unexpected)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the snapshot is an ordinary model directory
        self.model.max_seq_length = self.start_max_seq_length
        try:
            self.model.save(str(tmp), create_model_card=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self.model.max_seq_length = self.max_length
        replace_directory(tmp, path)
