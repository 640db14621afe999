"""GLUE-style evaluation of any AutoModel encoder, shaped like HF's run_glue_no_trainer.

    python -m textjepa.evaluation.glue --model_name_or_path DIR --train_file T --validation_file V \
        [--test_file X] --mode finetune|linear_probe --output_dir OUT
    python -m textjepa.evaluation.glue --model_name_or_path DIR --task_name sst2 ...   (hub, when online)

finetune:     AutoModelForSequenceClassification (textjepa registers its own) trained with accelerate;
              evaluated on validation after each epoch, the best epoch is kept and scored on test.
linear_probe: frozen pooled embeddings (computed once per distinct text), a logistic regression
              (C picked on validation) or a ridge regression for scores; pair tasks use [u, v, |u-v|, u*v].
Scores in the results JSON are x100. Sentence keys / labels / metric come from flags or task.json.
"""

import argparse
import inspect
import json
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import textjepa  # noqa: F401  registers textjepa's AutoModelForSequenceClassification
from textjepa.evaluation.metrics import classification_metrics, regression_metrics, with_intervals
from textjepa.evaluation.tasks import labels_of, load_task, texts_of

PROBE_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
PROBE_ALPHA_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


def score(spec, labels, predictions):
    """All metrics for the task kind, x100."""
    if spec.is_regression:
        metrics = regression_metrics(labels, predictions)
    else:
        metrics = classification_metrics(labels, predictions, spec.num_labels)
    return {name: 100.0 * value for name, value in metrics.items()}


# ---------------------------------------------------------------- linear probe
def probe_features(encoder, spec, show_progress=False):
    """{split: (N, D) features}; every distinct text across all splits is encoded exactly once."""
    texts_by_split = {split: texts_of(spec, split) for split in spec.splits}
    unique = sorted({t for s1, s2 in texts_by_split.values() for t in s1 + (s2 or [])})
    embeddings = encoder.encode(unique, show_progress=show_progress)  # (U, H)
    row_of = {text: i for i, text in enumerate(unique)}
    features = {}
    for split, (s1, s2) in texts_by_split.items():
        u = embeddings[[row_of[t] for t in s1]]
        if s2 is None:
            features[split] = u
        else:
            v = embeddings[[row_of[t] for t in s2]]
            features[split] = np.concatenate([u, v, np.abs(u - v), u * v], axis=1)  # (N, 4H)
    return features


def linear_probe(encoder, spec, show_progress=False, c_grid=PROBE_C_GRID, alpha_grid=PROBE_ALPHA_GRID):
    """Fit on train, choose C (or ridge alpha) by the task metric on validation, report validation and test."""
    start = time.time()
    results = fit_probe(probe_features(encoder, spec, show_progress=show_progress), spec, encoder.name, c_grid,
                        alpha_grid)
    results["seconds"] = time.time() - start
    return results


def fit_probe(features, spec, model_name, c_grid=PROBE_C_GRID, alpha_grid=PROBE_ALPHA_GRID):
    """The probe on any {split: (N, D) features} (dense, or sparse like TF-IDF): standardise with train
    statistics, logistic regression (ridge for scores) per grid value, keep the best on validation.
    Results x100, with a bootstrap interval of the headline metric per evaluated split."""
    import scipy.sparse
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    from textjepa.evaluation.metrics import bootstrap_replicates

    sparse = scipy.sparse.issparse(features["train"])
    scaler = StandardScaler(with_mean=not sparse).fit(features["train"])  # centring would densify sparse input
    features = {split: scaler.transform(x) for split, x in features.items()}
    labels = {split: labels_of(spec, split) for split in spec.splits}
    if not spec.is_regression and len(np.unique(labels["train"])) < 2:
        raise ValueError(f"{spec.split_files['train']}: only one class in the train split; a classifier needs two")
    best = None
    grid = alpha_grid if spec.is_regression else c_grid
    for value in grid:
        if spec.is_regression:
            model = Ridge(alpha=value)
        else:
            model = LogisticRegression(C=value, max_iter=1000)
        model.fit(features["train"], labels["train"])
        predictions = model.predict(features["validation"])
        validation = score(spec, labels["validation"], predictions)
        if best is None or validation[spec.metric] > best[1][spec.metric]:
            best = (value, validation, model, predictions)
    value, validation, model, predictions = best
    results = {"task": spec.name, "mode": "linear_probe", "model": model_name, "metric": spec.metric,
               "alpha" if spec.is_regression else "C": value, "validation": validation,
               "num_examples": {split: len(ds) for split, ds in spec.splits.items()},
               "replicates": {"validation": bootstrap_replicates(spec.metric, labels["validation"], predictions)}}
    if "test" in spec.splits:
        predictions = model.predict(features["test"])
        results["test"] = score(spec, labels["test"], predictions)
        results["replicates"]["test"] = bootstrap_replicates(spec.metric, labels["test"], predictions)
    return results


# ---------------------------------------------------------------- finetune
def finetune(model_name_or_path, spec, args):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              get_scheduler)

    from textjepa.evaluation.embedding import check_model_dir

    start = time.time()
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    path = check_model_dir(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # decoder-style tokenizers: pad with eos, masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(path, num_labels=spec.num_labels, finetuning_task=spec.name)
    config.pad_token_id = tokenizer.pad_token_id
    if spec.is_regression:
        config.problem_type = "regression"
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    forward_args = set(inspect.signature(model.forward).parameters)

    def tokenize(split):
        s1, s2 = texts_of(spec, split)
        encoded = tokenizer(s1, s2, truncation=True, max_length=args.max_length)
        labels = labels_of(spec, split)
        columns = {k: v for k, v in encoded.items() if k in forward_args}  # e.g. no token_type_ids for textjepa
        columns["labels"] = labels.astype(np.float32 if spec.is_regression else np.int64).tolist()
        return [dict(zip(columns, row)) for row in zip(*columns.values())]

    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
    with accelerator.main_process_first():
        examples = {split: tokenize(split) for split in spec.splits}
    train_loader = DataLoader(examples["train"], shuffle=True, collate_fn=collator,
                              batch_size=args.per_device_train_batch_size)
    eval_loaders = {split: DataLoader(examples[split], collate_fn=collator, batch_size=args.per_device_eval_batch_size)
                    for split in spec.splits if split != "train"}

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # A prepared scheduler steps once per process per optimizer step (accelerate), hence * num_processes.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, train_loader, scheduler, *loaders = accelerator.prepare(
        model, optimizer, train_loader, scheduler, *eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, loaders))

    def evaluate(split):
        model.eval()
        all_predictions, all_labels = [], []
        for batch in eval_loaders[split]:
            with torch.no_grad():
                logits = model(**batch).logits
            predictions = logits.squeeze(-1) if spec.is_regression else logits.argmax(-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            all_predictions.append(predictions.float().cpu() if spec.is_regression else predictions.cpu())
            all_labels.append(references.cpu())
        return score(spec, torch.cat(all_labels).numpy(), torch.cat(all_predictions).numpy())

    progress = tqdm(range(max_train_steps), desc=f"finetune {spec.name}", disable=not accelerator.is_local_main_process
                    or not args.show_progress)
    completed_steps, history, best = 0, [], None
    for epoch in range(num_epochs):
        model.train()
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
                completed_steps += 1
            if completed_steps >= max_train_steps:
                break
        validation = evaluate("validation")
        history.append({"epoch": epoch, "step": completed_steps, "validation": validation})
        accelerator.print(f"epoch {epoch}: validation {spec.metric} {validation[spec.metric]:.2f}")
        if best is None or validation[spec.metric] > best["validation"][spec.metric]:
            state = accelerator.unwrap_model(model).state_dict()
            best = {"epoch": epoch, "validation": validation,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in state.items()}}
        if completed_steps >= max_train_steps:
            break
    accelerator.unwrap_model(model).load_state_dict(best.pop("state"))
    results = {"task": spec.name, "mode": "finetune", "model": str(model_name_or_path), "metric": spec.metric,
               "best_epoch": best["epoch"], "validation": best["validation"], "history": history,
               "num_examples": {split: len(ds) for split, ds in spec.splits.items()}}
    if "test" in eval_loaders:
        results["test"] = evaluate("test")
    if args.save_model and args.output_dir and accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
    results["seconds"] = time.time() - start
    return results


# ---------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GLUE-style finetuning or linear probe of an AutoModel encoder")
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
    p.add_argument("--per_device_train_batch_size", type=int, default=32)
    p.add_argument("--per_device_eval_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--lr_scheduler_type", default="linear")
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean", help="linear_probe pooling")
    p.add_argument("--max_examples", type=int, default=None, help="truncate every split (smoke runs)")
    p.add_argument("--save_model", action="store_true", help="finetune: save the best model to --output_dir")
    p.add_argument("--no_progress", dest="show_progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    spec = load_task(train_file=args.train_file, validation_file=args.validation_file, test_file=args.test_file,
                     task_name=args.task_name, sentence1_key=args.sentence1_key, sentence2_key=args.sentence2_key,
                     label_key=args.label_key, num_labels=args.num_labels, metric=args.metric,
                     max_examples=args.max_examples)
    if args.mode == "finetune":
        results = finetune(args.model_name_or_path, spec, args)
    else:
        from textjepa.evaluation.embedding import SentenceEncoder

        encoder = SentenceEncoder(args.model_name_or_path, pooling=args.pooling, max_length=args.max_length,
                                  batch_size=args.per_device_eval_batch_size)
        results = linear_probe(encoder, spec, show_progress=args.show_progress)
    summary = f"{spec.name} {args.mode}: validation {spec.metric} {results['validation'][spec.metric]:.2f}"
    if "test" in results:
        summary += f", test {spec.metric} {results['test'][spec.metric]:.2f}"
    print(summary)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(with_intervals(results), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
