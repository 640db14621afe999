"""Model directories: which folder to load (check_model_dir: a transformers directory, a sentence-transformers
folder's transformer subfolder, or a hub name, with errors that name the folder) and the longest input an
encoder takes (default_max_length). Imported by encoder.py, the sentence-transformers export and glue alike,
so that neither of the first two imports the other back.
"""

import json
import os


def default_max_length(config, tokenizer, model_dir=None, cap=512):
    """Longest input to feed: a sentence-transformers directory's max_seq_length when present, else the
    smallest of the tokenizer's stated limit, the position table and `cap`."""
    if model_dir is not None and os.path.isfile(os.path.join(str(model_dir), "sentence_bert_config.json")):
        with open(os.path.join(str(model_dir), "sentence_bert_config.json")) as f:
            max_seq_length = json.load(f).get("max_seq_length")
        if max_seq_length:
            return int(max_seq_length)
    candidates = [cap]
    if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:  # HF uses 1e30 for "unset"
        candidates.append(int(tokenizer.model_max_length))
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        if "roberta" in getattr(config, "model_type", ""):
            from textjepa.data import roberta_position_offset

            positions -= roberta_position_offset(config.pad_token_id)
        candidates.append(int(positions))
    return min(candidates)


def _transformer_dir(model_dir):
    """A sentence-transformers directory may keep the transformer in a subfolder (modules.json says where)."""
    modules_file = os.path.join(model_dir, "modules.json")
    if os.path.isfile(modules_file):
        with open(modules_file) as f:
            modules = json.load(f)
        for module in modules:
            if module.get("type", "").endswith("Transformer") and module.get("path"):
                return os.path.join(model_dir, module["path"])
    return model_dir


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(model_name_or_path, trust_remote_code=False) -> str:
    """The directory to load (a sentence-transformers folder's transformer subfolder), or a hub name;
    raises naming the directory when it does not exist or lacks config.json / weights."""
    from transformers import AutoConfig

    path = str(model_name_or_path)
    if os.path.isdir(path):
        path = _transformer_dir(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path}: no config.json; not a transformers model directory "
                             "(expected the output of save_pretrained / textjepa export)")
        if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
            raise FileNotFoundError(f"{path}: no model weights; expected model.safetensors "
                                    "(the output of save_pretrained / textjepa export)")
        return path
    if os.path.sep in path.rstrip(os.path.sep) and path.count("/") != 1 or path.startswith((".", "~")):
        raise FileNotFoundError(f"{path}: model directory does not exist")
    try:  # a hub name: one clear line when it cannot be reached or does not exist
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{path}: neither a local model directory nor a loadable hub model "
                                f"({str(error).splitlines()[0]})") from None
    return path
