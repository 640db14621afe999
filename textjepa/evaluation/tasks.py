"""GLUE-style labelled tasks: where the text and labels are, and checks that say which file is wrong.

A task folder holds train/validation/test files (.jsonl, .jsonl.gz, .json, .csv, .parquet) and a
task.json (see ../shared/data/eval/*/task.json):
    {"kind": "sentence_pair", "keys": ["sentence1", "sentence2"], "num_labels": 3,
     "label_names": [...], "metric": "accuracy"}
num_labels == 1 means a regression task (a score). GLUE tasks by name come from the hub when online.
score() rates predictions with every metric of the task's kind (the probe's and fine-tuning's scale, x100).
"""

import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from textjepa.evaluation.metrics import GLUE_TASK_METRICS, classification_metrics, regression_metrics

SPLITS = ("train", "validation", "test")
EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")
# GLUE's sentence keys, as in transformers' run_glue_no_trainer.
TASK_TO_KEYS = {
    "cola": ("sentence", None), "mnli": ("premise", "hypothesis"), "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"), "qqp": ("question1", "question2"), "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None), "stsb": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}
METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")
METRIC_ALIASES = {"acc": "accuracy", "matthews_correlation": "matthews", "mcc": "matthews", "spearmanr": "spearman",
                  "pearsonr": "pearson", "f1_macro": "f1"}


@dataclass
class TaskSpec:
    name: str
    sentence1_key: str
    sentence2_key: str | None = None
    label_key: str = "label"
    num_labels: int = 2  # 1: regression on a score
    metric: str = "accuracy"  # headline metric, used to select the best epoch / C
    label_names: list | None = None
    source: str = ""  # where the spec came from, for error messages
    splits: dict = field(default_factory=dict)  # split -> datasets.Dataset
    split_files: dict = field(default_factory=dict)  # split -> file path (or hub name)

    @property
    def is_regression(self):
        return self.num_labels == 1

    @property
    def is_pair(self):
        return self.sentence2_key is not None


def normalize_metric(name, where):
    """One of METRICS for `name` or its alias; `where` (the flag, or the task.json path) leads the error."""
    metric = METRIC_ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else None
    if metric not in METRICS:
        raise ValueError(f"{where}: unknown metric {name!r}; expected one of {', '.join(METRICS)}")
    return metric


def score(spec, labels, predictions):
    """All metrics for the task kind, x100."""
    if spec.is_regression:
        metrics = regression_metrics(labels, predictions)
    else:
        metrics = classification_metrics(labels, predictions, spec.num_labels)
    return {name: 100.0 * value for name, value in metrics.items()}


def read_split_file(path):
    """One split as a datasets.Dataset, by extension (json handles .gz itself)."""
    import datasets

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file does not exist")
    from textjepa.data import datasets_builder

    if not path.lower().endswith(EXTENSIONS):
        raise ValueError(f"{path}: unsupported extension; expected one of {EXTENSIONS}")
    builder = datasets_builder(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty split (file has no bytes)")
    dataset = datasets.load_dataset(builder, data_files=path, split="train")
    if len(dataset) == 0:
        raise ValueError(f"{path}: empty split (no rows)")
    return dataset


def find_split_files(task_dir):
    """{split: path} for the split files found in a task folder."""
    found = {}
    for split in SPLITS:
        for ext in EXTENSIONS:
            path = os.path.join(task_dir, split + ext)
            if os.path.isfile(path):
                found[split] = path
                break
    return found


TASK_JSON_KEYS = ("kind", "keys", "num_labels", "label_names", "label_key", "metric", "source", "sizes")


def read_task_json(directory):
    path = os.path.join(directory, "task.json")
    if not os.path.isfile(path):
        return None, path
    with open(path) as f:
        try:
            info = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object with keys among {list(TASK_JSON_KEYS)}")
    unknown = sorted(set(info) - set(TASK_JSON_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; expected keys among {list(TASK_JSON_KEYS)}")
    return info, path


def load_task(train_file=None, validation_file=None, test_file=None, task_name=None, sentence1_key=None,
              sentence2_key=None, label_key=None, num_labels=None, metric=None, max_examples=None):
    """Build a TaskSpec with its splits loaded and checked. Flags override task.json beside the files."""
    if task_name and not (train_file or validation_file):
        return load_glue_from_hub(task_name, max_examples=max_examples)
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    files = {split: str(path) for split, path in files.items() if path}
    if "train" not in files or "validation" not in files:
        raise ValueError("need --train_file and --validation_file (or --task_name for a GLUE task from the hub)")
    info, info_path = read_task_json(os.path.dirname(os.path.abspath(files["train"])))
    info = info or {}
    keys = info.get("keys") or [None, None]
    name = task_name or os.path.basename(os.path.dirname(os.path.abspath(files["train"])))
    splits = {split: read_split_file(path) for split, path in files.items()}
    columns = splits["train"].column_names
    label_key = label_key or info.get("label_key", "label")
    s1 = sentence1_key or keys[0]
    s2 = sentence2_key or (keys[1] if len(keys) > 1 else None)
    if s1 is None:  # no task.json, no flags: GLUE-like guess from the columns
        if "sentence1" in columns and "sentence2" in columns:
            s1, s2 = "sentence1", "sentence2"
        else:
            text_columns = [c for c in columns if c != label_key]
            if not text_columns:
                raise ValueError(f"{files['train']}: no text column besides {label_key!r}")
            s1 = "sentence" if "sentence" in columns else text_columns[0]
    if num_labels is None:
        num_labels = info.get("num_labels")
    if num_labels is None:  # infer: float labels -> regression, else count of distinct labels
        if label_key not in columns:
            raise ValueError(f"{files['train']}: no label column {label_key!r} (columns: {columns})")
        labels = list(splits["train"][label_key])
        is_float = any(isinstance(v, float) and not float(v).is_integer() for v in labels)
        num_labels = 1 if is_float else len(set(labels))
    if metric:
        metric = normalize_metric(metric, "--metric")
    elif info.get("metric"):
        metric = normalize_metric(info["metric"], info_path)
    else:
        metric = "spearman" if num_labels == 1 else "accuracy"
    spec = TaskSpec(name=name, sentence1_key=s1, sentence2_key=s2, label_key=label_key, num_labels=int(num_labels),
                    metric=metric, label_names=info.get("label_names"), source=info_path if info else "flags",
                    splits=splits, split_files=files)
    if max_examples:
        spec.splits = {split: ds.select(range(min(max_examples, len(ds)))) for split, ds in spec.splits.items()}
    for split in spec.splits:
        check_texts(spec, split)
        labels_of(spec, split)  # raises on missing / out-of-range labels
    warn_unseen_labels(spec)
    return spec


def warn_unseen_labels(spec):
    """A class in validation/test that train never shows cannot be predicted by a probe: say which."""
    if spec.is_regression or "train" not in spec.splits:
        return
    seen = set(labels_of(spec, "train").tolist())
    for split in spec.splits:
        unseen = sorted(set(labels_of(spec, split).tolist()) - seen)
        if unseen:
            names = [spec.label_names[i] if spec.label_names and i < len(spec.label_names) else i for i in unseen]
            warnings.warn(f"{spec.split_files[split]}: label(s) {names} never appear in the train split "
                          f"({spec.split_files['train']}); a probe cannot predict them")


def load_task_dir(task_dir, max_examples=None):
    files = find_split_files(task_dir)
    for split in ("train", "validation"):
        if split not in files:
            raise FileNotFoundError(f"{task_dir}: no {split} file ({split}{{{','.join(EXTENSIONS)}}})")
    return load_task(train_file=files["train"], validation_file=files["validation"], test_file=files.get("test"),
                     task_name=os.path.basename(os.path.normpath(task_dir)), max_examples=max_examples)


def load_glue_from_hub(task_name, max_examples=None):
    import datasets

    if task_name not in TASK_TO_KEYS:
        raise ValueError(f"--task_name {task_name!r}: expected one of {sorted(TASK_TO_KEYS)}")
    raw = datasets.load_dataset("nyu-mll/glue", task_name)
    suffix = "_matched" if task_name == "mnli" else ""
    splits = {"train": raw["train"], "validation": raw["validation" + suffix], "test": raw["test" + suffix]}
    label_feature = raw["train"].features["label"]
    num_labels = 1 if task_name == "stsb" else label_feature.num_classes
    s1, s2 = TASK_TO_KEYS[task_name]
    spec = TaskSpec(name=task_name, sentence1_key=s1, sentence2_key=s2, num_labels=num_labels,
                    metric=GLUE_TASK_METRICS[task_name][0], label_names=getattr(label_feature, "names", None),
                    source=f"hub nyu-mll/glue/{task_name}", splits=splits,
                    split_files={s: f"nyu-mll/glue/{task_name}:{s}" for s in splits})
    if max_examples:
        spec.splits = {split: ds.select(range(min(max_examples, len(ds)))) for split, ds in spec.splits.items()}
    if all(label == -1 for label in spec.splits["test"]["label"]):  # GLUE hides test labels
        del spec.splits["test"]
    return spec


def check_texts(spec, split):
    dataset, path = spec.splits[split], spec.split_files[split]
    for key in (spec.sentence1_key, spec.sentence2_key):
        if key is None:
            continue
        if key not in dataset.column_names:
            raise ValueError(f"{path}: no text column {key!r} (columns: {dataset.column_names}; keys from {spec.source})")
        for row, text in enumerate(dataset[key]):
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {row} column {key!r} is {text!r}, expected a string")


def texts_of(spec, split):
    """(sentence1 list, sentence2 list or None)."""
    dataset = spec.splits[split]
    return list(dataset[spec.sentence1_key]), (list(dataset[spec.sentence2_key]) if spec.is_pair else None)


def labels_of(spec, split):
    """Checked labels: int64 class ids in [0, num_labels) or float64 scores."""
    dataset, path = spec.splits[split], spec.split_files[split]
    if spec.label_key not in dataset.column_names:
        raise ValueError(f"{path}: no label column {spec.label_key!r} (columns: {dataset.column_names})")
    raw = list(dataset[spec.label_key])
    if spec.is_regression:
        try:
            labels = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: label column {spec.label_key!r} must hold numbers for a regression task") from error
        if not np.isfinite(labels).all():
            raise ValueError(f"{path}: row {int(np.argmin(np.isfinite(labels)))} has a non-finite score")
        return labels
    if spec.label_names and any(isinstance(v, str) for v in raw):
        unknown = sorted({v for v in raw if v not in spec.label_names})
        if unknown:
            raise ValueError(f"{path}: labels {unknown[:5]} are not in label_names {spec.label_names}")
        raw = [spec.label_names.index(v) for v in raw]
    labels = np.asarray(raw)
    if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{path}: label column {spec.label_key!r} holds {labels.dtype} values; expected integer "
                         f"class ids 0..{spec.num_labels - 1}")
    bad = np.flatnonzero((labels < 0) | (labels >= spec.num_labels))
    if bad.size:
        raise ValueError(f"{path}: row {int(bad[0])} has label {labels[bad[0]]}, outside 0..{spec.num_labels - 1} "
                         f"(num_labels={spec.num_labels} from {spec.source}; {bad.size} such rows)")
    return labels.astype(np.int64)
