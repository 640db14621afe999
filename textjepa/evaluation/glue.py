"""GLUE-style fine-tuning of any AutoModel encoder, shaped like HF's run_glue_no_trainer.

    python -m textjepa.evaluation.glue --model_name_or_path DIR --train_file T --validation_file V \
        [--test_file X] --mode finetune|linear_probe --output_dir OUT
    python -m textjepa.evaluation.glue --model_name_or_path DIR --task_name sst2 ...   (hub, when online)

finetune:     AutoModelForSequenceClassification (textjepa registers its own) trained with accelerate;
              evaluated on validation after each epoch, the best epoch is kept and scored on test
              (--early_stopping_patience N stops after N epochs without a better validation score).
              Pair tasks: --pair_head cross_encoder (the pair as one input, the default), or a bi-encoder
              that pools u and v separately: cosine (regression only; MSE of cos(u, v) against the scores
              min-max scaled to [0, 1] over train, as Sentence-BERT's CosineSimilarityLoss) or concat
              ([u, v, |u-v|, u*v] -> linear head). --warmup_ratio and --layerwise_lr_decay as in HF's scripts.
linear_probe: the evaluation suite's frozen probe (probe.linear_probe): a logistic regression (C picked
              on validation) or a ridge regression for scores on pooled embeddings; pairs as [u, v, |u-v|, u*v].
Scores in results.json are x100; all_results.json beside it has HF's keys and scale (eval_accuracy 0.85 for
validation, test_accuracy for test). Sentence keys / labels / metric come from flags or task.json.

HF's flags and defaults (batch 8, not seeded) hold: --pad_to_max_length, --trust_remote_code,
--ignore_mismatched_sizes, --checkpointing_steps N|epoch (accelerate's state in output_dir/step_N or epoch_N),
--resume_from_checkpoint DIR (ends exactly as the uninterrupted run: the checkpoint also keeps the epoch's
shuffling seed, the validation history and the best epoch's weights), --with_tracking / --report_to.
"""

import argparse
import inspect
import json
import math
import os
import re
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.modeling_outputs import SequenceClassifierOutput

import textjepa  # noqa: F401  registers textjepa's AutoModelForSequenceClassification
from textjepa.evaluation.metrics import with_intervals
from textjepa.evaluation.probe import linear_probe
from textjepa.evaluation.tasks import labels_of, load_task, score, texts_of

PAIR_HEADS = ("cross_encoder", "cosine", "concat")


class BiEncoder(torch.nn.Module):
    """Siamese pair model on an AutoModel encoder: u and v are pooled separately, then "cosine" scores
    cos(u, v) (regression) and "concat" feeds [u, v, |u-v|, u*v] to a linear head (Sentence-BERT).

    token_weights (V,) and whitening (mean (H,), matrix (H, H)) are an export's shipped post-processing,
    applied as SentenceEncoder and SentenceTransformer(export) apply them: the weights (fixed) turn mean
    pooling into a weighted mean; the whitening becomes a trainable linear map that starts at
    (x - mean) @ matrix, like the Dense module sentence-transformers would finetune."""

    def __init__(self, encoder, num_labels, head, pooling="mean", token_weights=None, whitening=None):
        super().__init__()
        self.encoder, self.head, self.pooling = encoder, head, pooling
        self.config = encoder.config
        self.forward_args = set(inspect.signature(encoder.forward).parameters)
        weights = torch.as_tensor(token_weights, dtype=torch.float32) if token_weights is not None else None
        self.register_buffer("token_weights", weights, persistent=False)
        self.whiten = None
        if whitening is not None:
            mean, matrix = (torch.as_tensor(a, dtype=torch.float32) for a in whitening)
            self.whiten = torch.nn.Linear(matrix.shape[0], matrix.shape[1])
            with torch.no_grad():  # x @ W.T + b == (x - mean) @ matrix
                self.whiten.weight.copy_(matrix.T)
                self.whiten.bias.copy_(-mean @ matrix)
        if head == "concat":
            self.dropout = torch.nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
            self.classifier = torch.nn.Linear(4 * encoder.config.hidden_size, num_labels)

    def embed(self, **inputs):
        from textjepa import pool_hidden_states

        hidden = self.encoder(**{k: v for k, v in inputs.items() if k in self.forward_args}).last_hidden_state
        weights = inputs["attention_mask"]  # (B, T)
        if self.token_weights is not None and self.pooling == "mean":
            weights = weights * self.token_weights[inputs["input_ids"]]
        pooled = pool_hidden_states(hidden, weights, self.pooling)  # (B, H)
        return self.whiten(pooled) if self.whiten is not None else pooled

    def forward(self, labels=None, **batch):
        u = self.embed(**{k: v for k, v in batch.items() if not k.endswith("_b")})
        v = self.embed(**{k[:-2]: v for k, v in batch.items() if k.endswith("_b")})
        if self.head == "cosine":
            logits = torch.nn.functional.cosine_similarity(u, v, dim=-1).unsqueeze(-1)  # (B, 1)
        else:
            logits = self.classifier(self.dropout(torch.cat([u, v, (u - v).abs(), u * v], dim=-1)))  # (B, C)
        loss = None
        if labels is not None:
            if logits.shape[-1] == 1:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def layer_depth(name, num_layers):
    """0 for embeddings, i + 1 for transformer layer i, num_layers + 1 for everything above (norm, pooler, head)."""
    match = re.search(r"\.(?:layer|layers)\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return 0 if "embeddings" in name else num_layers + 1


def parameter_groups(model, learning_rate, weight_decay, layerwise_lr_decay=1.0):
    """AdamW groups: no weight decay on biases and norms (pretraining's takes_weight_decay); with
    layerwise_lr_decay < 1 the learning rate shrinks by that factor per layer from the head down to the
    embeddings (ELECTRA / BEiT style)."""
    from textjepa.optimization import takes_weight_decay

    num_layers = model.config.num_hidden_layers
    groups = {}
    for name, parameter in model.named_parameters():
        depth = layer_depth(name, num_layers)
        decay = weight_decay if takes_weight_decay(name, parameter) else 0.0
        lr = learning_rate * layerwise_lr_decay ** (num_layers + 1 - depth)
        groups.setdefault((lr, decay), []).append(parameter)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


class EpochSampler(torch.utils.data.RandomSampler):
    """torch's RandomSampler (the same draws from the global RNG, so the same order under a seed) that keeps
    the seed of the order it serves: a checkpoint stores it, so that a resumed run replays the interrupted
    epoch's order before skipping the batches already trained on. With several processes accelerate orders the
    batches with a generator of its own, which checkpoints do not keep: a resumed epoch is then reshuffled, as in
    HF's script."""

    seed, replay = None, None

    def __iter__(self):
        if self.generator is not None:  # several processes: accelerate synchronises this generator
            yield from super().__iter__()
            return
        self.seed = self.replay if self.replay is not None else int(torch.empty((), dtype=torch.int64).random_().item())
        self.replay = None
        yield from torch.randperm(len(self.data_source), generator=torch.Generator().manual_seed(self.seed)).tolist()


class TrainingRun:
    """What a checkpoint holds beyond accelerate's model / optimizer / scheduler / RNG states, so that a
    resumed run ends exactly as an uninterrupted one: where it stopped (epoch, batches of that epoch,
    optimizer steps), the epoch's shuffling seed, the epochs' validation history and the best epoch's weights
    (kept for the final test), the epoch's summed loss (for the trackers)."""

    def __init__(self):
        self.epoch, self.batches, self.completed_steps, self.seed = 0, 0, 0, None
        self.history, self.best, self.loss_sum = [], None, 0.0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def resumed(loader, rng_state):
    """`loader`'s batches, with torch's global RNG set back to `rng_state` (the checkpoint's) once the loader
    has started, and also when it yields nothing: starting it drew torch's worker base seed from that RNG, a
    draw the interrupted run made before its checkpoint rather than after."""
    batches = iter(loader)
    first = next(batches, None)
    torch.set_rng_state(rng_state)
    if first is not None:
        yield first
        yield from batches


def tracker_names(report_to):
    """--report_to as accelerate's log_with: "all" or names separated by commas. A tracker whose package is
    not installed is left out with one line, rather than by accelerate's silent debug message."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [name.strip() for name in str(report_to).split(",") if name.strip()]
    if names == ["all"]:
        return "all"
    unknown = [name for name in names if name not in LOGGER_TYPE_TO_CLASS]
    if unknown or not names:
        raise ValueError(f"--report_to {report_to}: expected all, or one or more (comma-separated) of "
                         f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in available:
            print(f"--report_to {name}: its package is not installed; not logging to it")
    return [name for name in names if name in available]


def finetune(model_name_or_path, spec, args):
    """Finetune on spec's train split as HF's run_glue_no_trainer.py does (accelerate; args: parse_args'
    Namespace, every flag in it), keep the epoch with the best validation score and score it on test:
    results.json's dict.

    An accelerate loop rather than transformers.Trainer(load_best_model_at_end=True): Trainer refuses
    --checkpointing_steps N with per-epoch validation ("--load_best_model_at_end requires the save and eval
    strategy to match"), writes checkpoint-N folders of its own rather than accelerate's step_N / epoch_N
    (Accelerator.save_state / load_state, which --resume_from_checkpoint reads and the tests interrupt), and
    logs eval/<metric> rather than the validation_<metric> and train_loss scalars of HF's script."""
    start = time.time()
    run = Finetuning(model_name_or_path, spec, args)
    run.train()
    return run.results(start)


# ---------------------------------------------------------------- finetuning: the set-up, in the order it runs
def check_flags(spec, args):
    """The pair head this task takes: --pair_head for a pair task, "cross_encoder" for a single-sentence one.
    Refuses flags that do not go together, naming them, before anything is loaded or trained."""
    pair_head = args.pair_head if spec.is_pair else "cross_encoder"
    if pair_head not in PAIR_HEADS:
        raise ValueError(f"--pair_head {pair_head!r}: expected one of {PAIR_HEADS}")
    if pair_head == "cosine" and not spec.is_regression:
        raise ValueError(f"--pair_head cosine scores a regression task; {spec.name} has {spec.num_labels} "
                         f"labels ({spec.source}): use --pair_head concat or cross_encoder")
    if args.with_tracking and not args.output_dir:
        raise ValueError("--with_tracking: needs --output_dir (the trackers write their logs under it)")
    resume = args.resume_from_checkpoint
    # custom_checkpoint_0.pkl is our TrainingRun, which every checkpoint of ours holds: checked now rather
    # than after the model and data are loaded
    if resume and not os.path.isfile(os.path.join(resume, "custom_checkpoint_0.pkl")):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: not a checkpoint folder written by "
                                "--checkpointing_steps (step_N or epoch_N under an output_dir)")
    return pair_head


def make_accelerator(args):
    """The Accelerator: --gradient_accumulation_steps, --mixed_precision, output_dir as its project_dir, and
    with --with_tracking the --report_to trackers (tracker_names) as its log_with."""
    from accelerate import Accelerator

    trackers = tracker_names(args.report_to) if args.with_tracking else None
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision, log_with=trackers or None, project_dir=args.output_dir)


def load_model(model_name_or_path, spec, args, pair_head):
    """Tokenizer, config (the task's labels) and model: a sequence classifier for the cross-encoder, else a
    BiEncoder over AutoModel with the shipped post-processing (--post_processing shipped).

    Returns (path, tokenizer, config, model, post_processing): path as check_model_dir resolved it;
    post_processing the names of the shipped parts the bi-encoder applies (token_weights, whitening; [] for
    none and for the cross-encoder). transformers' own errors for a model's own code and for a head of the
    wrong size become one line naming our flag."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from textjepa.embedding.model_dir import check_model_dir
    from textjepa.embedding.postprocessing import load_token_weights, load_whitening

    trust = args.trust_remote_code
    path = check_model_dir(model_name_or_path, trust)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if tokenizer.pad_token is None:  # decoder-style tokenizers: pad with eos, masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    try:
        config = AutoConfig.from_pretrained(path, num_labels=spec.num_labels, finetuning_task=spec.name,
                                            trust_remote_code=trust)
    except ValueError as error:  # transformers' own message names the Python argument, not our flag
        if trust or "trust_remote_code" not in str(error):
            raise
        raise ValueError(f"{path}: its config.json names code of its own (auto_map) for a model type this "
                         "Python does not know; pass --trust_remote_code to run it") from None
    config.pad_token_id = tokenizer.pad_token_id
    if spec.is_regression:
        config.problem_type = "regression"
    if pair_head == "cross_encoder":
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, trust_remote_code=trust, ignore_mismatched_sizes=args.ignore_mismatched_sizes)
        except RuntimeError as error:  # transformers' own message is a page of shapes
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(f"{path}: its weights do not fit a {spec.num_labels}-label head (size mismatch); "
                             "pass --ignore_mismatched_sizes to start those weights afresh") from None
        return path, tokenizer, config, model, []
    token_weights = whitening = None
    if args.post_processing == "shipped" and os.path.isdir(path):  # a hub name ships no files of ours
        token_weights, whitening = load_token_weights(path, len(tokenizer)), load_whitening(path)
    model = BiEncoder(AutoModel.from_pretrained(path, config=config, trust_remote_code=trust),
                      spec.num_labels, pair_head, args.pooling, token_weights, whitening)
    post_processing = [name for name, part in (("token_weights", token_weights), ("whitening", whitening))
                       if part is not None]
    return path, tokenizer, config, model, post_processing


def tokenize_split(spec, split, tokenizer, model, pair_head, max_length, padding):
    """One split as a list of rows (dicts), each the model inputs of one example (token id lists, at most
    max_length long; padding: False or "max_length") and its `labels` (a float for regression, else an int).
    A cross-encoder's row holds only the inputs model.forward takes; a bi-encoder's holds the second text's
    inputs as `<input>_b` columns."""
    s1, s2 = texts_of(spec, split)
    if pair_head == "cross_encoder":
        forward_args = set(inspect.signature(model.forward).parameters)
        encoded = tokenizer(s1, s2, truncation=True, max_length=max_length, padding=padding)
        columns = {k: v for k, v in encoded.items() if k in forward_args}  # e.g. no token_type_ids for some models
    else:  # the bi-encoder passes its encoder only the inputs it takes
        columns = {**tokenizer(s1, truncation=True, max_length=max_length, padding=padding),
                   **{k + "_b": v for k, v in tokenizer(s2, truncation=True, max_length=max_length,
                                                        padding=padding).items()}}
    labels = labels_of(spec, split)
    if pair_head == "cosine":  # cosines live in [-1, 1]: fit scores scaled to [0, 1] (metrics are rank/affine-free)
        train_labels = labels_of(spec, "train")
        labels = (labels - train_labels.min()) / max(np.ptp(train_labels), 1e-12)
    columns["labels"] = labels.astype(np.float32 if spec.is_regression else np.int64).tolist()
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def pair_collator(tokenizer, pair_head, pad_to_multiple_of):
    """The loaders' collate_fn: rows (tokenize_split's) -> a batch of tensors, input_ids / attention_mask
    (B, T) padded to the longest row (T rounded up to pad_to_multiple_of when set) and labels (B,); for a
    bi-encoder also the second texts' inputs as `<input>_b` (B, T_b), padded on their own."""
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def collate(rows):
        batch = pad([{k: v for k, v in row.items() if not k.endswith("_b")} for row in rows])
        if pair_head != "cross_encoder":
            second = pad([{k[:-2]: v for k, v in row.items() if k.endswith("_b")} for row in rows])
            batch.update({k + "_b": v for k, v in second.items()})
        return batch

    return collate


def make_loaders(spec, args, tokenizer, model, pair_head, max_length, accelerator):
    """Every split tokenized once (main process first, as HF's script), a shuffled train loader a resumed run
    can replay, one loader per evaluated split. Batches are padded to their longest
    input (a multiple of 8 under mixed precision, for the tensor cores) unless --pad_to_max_length.

    Returns (sampler, train_loader, eval_loaders): sampler the train loader's EpochSampler, eval_loaders
    {split: DataLoader} for every split but train, in spec.splits' order; none of them prepared yet."""
    from torch.utils.data import DataLoader

    padding = "max_length" if args.pad_to_max_length else False  # else each batch is padded to its longest
    multiple = 8 if accelerator.mixed_precision != "no" and not args.pad_to_max_length else None
    collate = pair_collator(tokenizer, pair_head, multiple)
    with accelerator.main_process_first():
        examples = {split: tokenize_split(spec, split, tokenizer, model, pair_head, max_length, padding)
                    for split in spec.splits}
    sampler = EpochSampler(examples["train"])  # shuffle=True's sampler, which a resumed run can replay
    train_loader = DataLoader(examples["train"], sampler=sampler, collate_fn=collate,
                              batch_size=args.per_device_train_batch_size)
    eval_loaders = {split: DataLoader(examples[split], collate_fn=collate, batch_size=args.per_device_eval_batch_size)
                    for split in spec.splits if split != "train"}
    return sampler, train_loader, eval_loaders


def training_length(args, num_batches):
    """The run's length in optimizer steps, as HF's script: num_batches (train batches per epoch, before
    accelerate shards them) -> (max_train_steps, num_epochs, warmup_steps). --max_train_steps, when set,
    overrides --num_train_epochs; --num_warmup_steps, when not 0, overrides --warmup_ratio."""
    steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup_steps = args.num_warmup_steps or math.ceil(args.warmup_ratio * max_train_steps)
    return max_train_steps, num_epochs, warmup_steps


def make_optimizer(model, args, max_train_steps, warmup_steps, num_processes):
    """AdamW over parameter_groups and HF's LR schedule (--lr_scheduler_type) sized in optimizer steps:
    (optimizer, scheduler)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(parameter_groups(model, args.learning_rate, args.weight_decay,
                                                   args.layerwise_lr_decay), lr=args.learning_rate)
    # A prepared scheduler steps once per process per optimizer step (accelerate), hence * num_processes.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=warmup_steps * num_processes,
                              num_training_steps=max_train_steps * num_processes)
    return optimizer, scheduler


def resume_from_checkpoint(accelerator, checkpoint, state, sampler):
    """As HF's script: accelerate's load_state from `checkpoint` (a --resume_from_checkpoint folder, or None:
    a fresh run), which also fills `state` (the TrainingRun registered for checkpointing); the training loop
    then skips the batches the checkpoint had trained on. Returns torch's RNG state at the checkpoint when it
    stopped within an epoch, `sampler` set to replay that epoch's order; else None (an epoch_N checkpoint
    starts the next epoch afresh)."""
    if not checkpoint:
        return None
    accelerator.load_state(checkpoint)
    accelerator.print(f"Resumed from checkpoint: {checkpoint}")
    if not state.batches:
        return None
    sampler.replay = state.seed
    return torch.get_rng_state()


def start_trackers(accelerator, args):
    """The trackers' run, under HF's script's project name, with the flags as its hyperparameters: only the
    int / float / str / bool ones, the types every tracker takes (TensorBoard's hparams refuse None)."""
    accelerator.init_trackers("glue_no_trainer", {k: v for k, v in vars(args).items()
                                                  if isinstance(v, (int, float, str, bool))})


def save_finetuned(model, tokenizer, pair_head, output_dir):
    """--save_model: a cross-encoder as a transformers model; a bi-encoder's encoder as one (AutoModel loads it)
    with the pair head's own weights (whitening, classifier) beside it in pair_head.pt; the tokenizer.
    model: unwrapped from accelerate."""
    if pair_head == "cross_encoder":
        model.save_pretrained(output_dir)
    else:  # the encoder as a transformers model, the pair head beside it
        model.encoder.save_pretrained(output_dir)
        torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")},
                   os.path.join(output_dir, "pair_head.pt"))
    tokenizer.save_pretrained(output_dir)


class Finetuning:
    """One finetuning run. Set up in order (the functions above): flags checked, Accelerator and seed, model (a
    sequence classifier, or the bi-encoder for --pair_head cosine / concat), tokenized splits and loaders,
    AdamW and the LR schedule, accelerate.prepare, then a checkpoint's state when resuming. `state` (a
    TrainingRun) is what a checkpoint holds beyond accelerate's own states."""

    def __init__(self, model_name_or_path, spec, args):
        from accelerate.utils import set_seed

        from textjepa.embedding.model_dir import default_max_length

        self.model_name_or_path, self.spec, self.args = model_name_or_path, spec, args
        self.pair_head = check_flags(spec, args)
        self.tracking, self.checkpointing = args.with_tracking, args.checkpointing_steps
        self.accelerator = accelerator = make_accelerator(args)
        if args.seed is not None:  # None: not seeded, as HF's script
            set_seed(args.seed)
        path, self.tokenizer, config, model, self.post_processing = load_model(model_name_or_path, spec, args,
                                                                               self.pair_head)
        # never longer than the model's positions (a small pretrained encoder may hold fewer than --max_length)
        max_length = min(args.max_length, default_max_length(config, self.tokenizer, path))
        self.sampler, train_loader, eval_loaders = make_loaders(spec, args, self.tokenizer, model, self.pair_head,
                                                                max_length, accelerator)
        self.max_train_steps, self.num_epochs, self.warmup_steps = training_length(args, len(train_loader))
        optimizer, scheduler = make_optimizer(model, args, self.max_train_steps, self.warmup_steps,
                                              accelerator.num_processes)
        self.model, self.optimizer, self.train_loader, self.scheduler, *loaders = accelerator.prepare(
            model, optimizer, train_loader, scheduler, *eval_loaders.values())
        self.eval_loaders = dict(zip(eval_loaders, loaders))
        self.state = TrainingRun()
        accelerator.register_for_checkpointing(self.state)
        self.rng_state = resume_from_checkpoint(accelerator, args.resume_from_checkpoint, self.state, self.sampler)
        if self.tracking:
            start_trackers(accelerator, args)

    def save_checkpoint(self, name):
        """accelerate's state (model, optimizer, scheduler, RNGs and `state`) in output_dir/name."""
        self.accelerator.save_state(os.path.join(self.args.output_dir or ".", name))

    def train(self):
        """The epochs: train, validate, keep the best; --early_stopping_patience epochs without a better
        validation score end it early."""
        spec, state = self.spec, self.state
        progress = tqdm(range(self.max_train_steps), desc=f"finetune {spec.name}",
                        disable=not self.accelerator.is_local_main_process or not self.args.show_progress)
        progress.update(state.completed_steps)
        patience = self.args.early_stopping_patience
        for epoch in range(state.epoch, self.num_epochs):
            if patience is not None and state.best is not None and epoch - 1 - state.best["epoch"] >= patience:
                self.accelerator.print(f"early stop: no better validation {spec.metric} for {patience} epoch(s)")
                break
            self._train_epoch(progress)
            self._end_epoch(epoch)
            if state.completed_steps >= self.max_train_steps:
                break
        if self.tracking:
            self.accelerator.end_training()

    def _train_epoch(self, progress):
        """One pass over the train loader (the rest of it, when resuming mid-epoch), a checkpoint every
        --checkpointing_steps optimizer steps."""
        accelerator, state, model = self.accelerator, self.state, self.model
        model.train()
        batches = self.train_loader
        if self.rng_state is not None:
            batches = resumed(accelerator.skip_first_batches(self.train_loader, state.batches), self.rng_state)
            self.rng_state = None
        for batch in batches:
            if state.completed_steps >= self.max_train_steps:
                break
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            state.batches, state.seed = state.batches + 1, self.sampler.seed
            if self.tracking:
                state.loss_sum += loss.item()
            if accelerator.sync_gradients:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
                state.completed_steps += 1
                if isinstance(self.checkpointing, int) and state.completed_steps % self.checkpointing == 0:
                    self.save_checkpoint(f"step_{state.completed_steps}")

    def _end_epoch(self, epoch):
        """Validation score into the history, the weights kept (on the CPU) when it is the best so far, the
        trackers' log, and an epoch_N checkpoint with --checkpointing_steps epoch."""
        spec, state, accelerator = self.spec, self.state, self.accelerator
        validation = score(spec, *self.predict("validation"))
        state.history.append({"epoch": epoch, "step": state.completed_steps, "validation": validation})
        accelerator.print(f"epoch {epoch}: validation {spec.metric} {validation[spec.metric]:.2f}")
        if state.best is None or validation[spec.metric] > state.best["validation"][spec.metric]:
            weights = accelerator.unwrap_model(self.model).state_dict()
            state.best = {"epoch": epoch, "validation": validation,
                          "state": {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}}
        if self.tracking:
            accelerator.log({**{f"validation_{k}": float(v) for k, v in validation.items()}, "epoch": epoch,
                             "train_loss": state.loss_sum / len(self.train_loader), "step": state.completed_steps},
                            step=state.completed_steps)
        state.epoch, state.batches, state.loss_sum = epoch + 1, 0, 0.0
        if self.checkpointing == "epoch":
            self.save_checkpoint(f"epoch_{epoch}")

    def predict(self, split):
        """(labels, predictions) over one evaluated split, gathered from every process."""
        self.model.eval()
        all_predictions, all_labels = [], []
        for batch in self.eval_loaders[split]:
            with torch.no_grad():
                logits = self.model(**batch).logits
            predictions = logits.squeeze(-1) if self.spec.is_regression else logits.argmax(-1)
            predictions, references = self.accelerator.gather_for_metrics((predictions, batch["labels"]))
            all_predictions.append(predictions.float().cpu() if self.spec.is_regression else predictions.cpu())
            all_labels.append(references.cpu())
        return torch.cat(all_labels).numpy(), torch.cat(all_predictions).numpy()

    def results(self, start):
        """results.json's dict: the best epoch's validation scores and its test scores (its weights loaded
        back), the history; with --save_model the best model in output_dir."""
        spec, args, best = self.spec, self.args, self.state.best
        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.load_state_dict(best.pop("state"))
        results = {"task": spec.name, "mode": "finetune", "model": str(self.model_name_or_path),
                   "metric": spec.metric, "pair_head": self.pair_head if spec.is_pair else None,
                   "post_processing": self.post_processing, "learning_rate": args.learning_rate, "seed": args.seed,
                   "warmup_steps": self.warmup_steps, "best_epoch": best["epoch"], "validation": best["validation"],
                   "history": self.state.history,
                   "num_examples": {split: len(ds) for split, ds in spec.splits.items()}}
        if "test" in self.eval_loaders:
            labels, predictions = self.predict("test")
            results["test"] = score(spec, labels, predictions)
            results["test_predictions"] = predictions.tolist()  # per example, for bootstrap intervals
        if args.save_model and args.output_dir and self.accelerator.is_main_process:
            save_finetuned(unwrapped, self.tokenizer, self.pair_head, args.output_dir)
        results["seconds"] = time.time() - start
        return results


# ---------------------------------------------------------------- command line
MODULE_PROG = "python -m textjepa.evaluation.glue"


def true_or_false(text):
    """HF's bool flags: `--trust_remote_code` alone, or followed by true / false."""
    if text.lower() in ("true", "yes", "1", "false", "no", "0"):
        return text.lower() in ("true", "yes", "1")
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def steps_or_epoch(text):
    if text == "epoch" or (text.isdigit() and int(text) > 0):
        return text if text == "epoch" else int(text)
    raise argparse.ArgumentTypeError(f"expected 'epoch' or a positive number of steps, got {text!r}")


def hf_results(results):
    """HF's all_results.json: eval_<metric> for validation, test_<metric> for test, in HF's scale (fractions,
    as `evaluate` returns them; results.json holds the same scores x100)."""
    return {f"{prefix}_{name}": value / 100.0 for split, prefix in (("validation", "eval"), ("test", "test"))
            for name, value in results.get(split, {}).items()}


def parse_args(argv=None, prog=None):
    """The flags and their defaults, written here only: code that calls finetune() starts from
    parse_args(["--model_name_or_path", ...]) and sets the attributes it changes."""
    p = argparse.ArgumentParser(prog=prog, description="GLUE-style finetuning or linear probe of an AutoModel "
                                "encoder; flags as HF's run_glue_no_trainer.py")
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--task_name", default=None, help="GLUE task (hub, needs network) or a name for local files")
    p.add_argument("--train_file")
    p.add_argument("--validation_file")
    p.add_argument("--test_file")
    p.add_argument("--sentence1_key")
    p.add_argument("--sentence2_key")
    p.add_argument("--label_key")
    p.add_argument("--num_labels", type=int, help="1 for regression; default from task.json or the data")
    p.add_argument("--metric", help="selection metric: accuracy, f1, matthews, pearson, spearman")
    p.add_argument("--mode", choices=["finetune", "linear_probe"], default="finetune")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--pad_to_max_length", action="store_true",
                   help="pad every batch to --max_length (default: each batch to its longest input)")
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--per_device_eval_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--lr_scheduler_type", default="linear")
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--warmup_ratio", type=float, default=0.0, help="warmup as a fraction of the training steps "
                   "(used when --num_warmup_steps is 0)")
    p.add_argument("--layerwise_lr_decay", type=float, default=1.0,
                   help="finetune: lr x this per layer below the head (e.g. 0.8); 1.0 = one lr for all")
    p.add_argument("--early_stopping_patience", type=int, default=None,
                   help="finetune: stop after this many epochs without a better validation score")
    p.add_argument("--pair_head", choices=PAIR_HEADS, default="cross_encoder",
                   help="finetune, pair tasks: the pair as one input, or a bi-encoder with a cosine / "
                        "[u, v, |u-v|, u*v] head (ignored for single-sentence tasks)")
    p.add_argument("--post_processing", choices=["shipped", "none"], default="shipped",
                   help="bi-encoder heads: apply the SIF token weights and whitening an export ships (as "
                        "SentenceTransformer(export) does; the whitening is finetuned) or pool the raw states")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--seed", type=int, default=None, help="default: not seeded (as HF)")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean", help="linear_probe and bi-encoder pooling")
    p.add_argument("--max_examples", type=int, default=None, help="truncate every split (smoke runs)")
    p.add_argument("--max_train_samples", type=int, default=None, help="keep the first N train examples")
    p.add_argument("--max_eval_samples", type=int, default=None,
                   help="keep the first N validation examples (test is never truncated by this)")
    p.add_argument("--save_model", action="store_true", help="finetune: save the best model to --output_dir")
    p.add_argument("--trust_remote_code", nargs="?", const=True, default=False, type=true_or_false,
                   help="run a model directory's own code (auto_map); textjepa models load without it")
    p.add_argument("--ignore_mismatched_sizes", action="store_true",
                   help="finetune: start afresh the head weights whose shapes differ from the task's")
    p.add_argument("--checkpointing_steps", type=steps_or_epoch, default=None,
                   help="finetune: save accelerate's state every N optimizer steps (output_dir/step_N) or after "
                        "every epoch (epoch: output_dir/epoch_N)")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="finetune: a step_N / epoch_N folder; training resumes exactly where it stopped")
    p.add_argument("--with_tracking", action="store_true",
                   help="finetune: log validation scores and train loss per epoch to --report_to")
    p.add_argument("--report_to", default="all",
                   help="all (every installed tracker), or trackers separated by commas: tensorboard, wandb, ...")
    p.add_argument("--no_progress", dest="show_progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None, prog="textjepa glue"):
    args = parse_args(argv, prog)
    spec = load_task(train_file=args.train_file, validation_file=args.validation_file, test_file=args.test_file,
                     task_name=args.task_name, sentence1_key=args.sentence1_key, sentence2_key=args.sentence2_key,
                     label_key=args.label_key, num_labels=args.num_labels, metric=args.metric,
                     max_examples=args.max_examples)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit:
            spec.splits[split] = spec.splits[split].select(range(min(limit, len(spec.splits[split]))))
    if args.mode == "finetune":
        results = finetune(args.model_name_or_path, spec, args)
    else:
        from textjepa.embedding.encoder import SentenceEncoder

        encoder = SentenceEncoder(args.model_name_or_path, pooling=args.pooling, max_length=args.max_length,
                                  batch_size=args.per_device_eval_batch_size, trust_remote_code=args.trust_remote_code)
        results = linear_probe(encoder, spec, show_progress=args.show_progress)
    summary = f"{spec.name} {args.mode}: validation {spec.metric} {results['validation'][spec.metric]:.2f}"
    if "test" in results:
        summary += f", test {spec.metric} {results['test'][spec.metric]:.2f}"
    print(summary)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(with_intervals(results), f, indent=2)
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
            json.dump(hf_results(results), f, indent=2)
    return 0


if __name__ == "__main__":
    import sys

    from textjepa.cli import run

    raise SystemExit(run(MODULE_PROG, lambda argv: main(argv, MODULE_PROG), sys.argv[1:]))
