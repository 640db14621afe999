import os

import pytest
import torch

# Tests never reach a hub; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config_kwargs(**overrides):
    """A model small enough that a forward + backward takes milliseconds on one CPU core."""
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        predictor_hidden_size=16,
        predictor_num_hidden_layers=2,
        predictor_num_attention_heads=2,
        target_num_layers=2,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_config():
    from textjepa import TextJepaConfig

    return TextJepaConfig(**tiny_config_kwargs())
