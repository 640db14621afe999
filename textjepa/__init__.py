"""textjepa: Joint-Embedding Predictive pretraining for text, Hugging Face native.

Importing the package registers the model with transformers' Auto classes, so
`AutoModel.from_pretrained(dir)` returns a `TextJepaModel` for any textjepa export.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
)

from .configuration_textjepa import TextJepaConfig
from .modeling_textjepa import (
    TextJepaForSequenceClassification,
    TextJepaModel,
    TextJepaPreTrainedModel,
    pool_hidden_states,
)
from .pretraining import TextJepaForPreTraining, TextJepaForPreTrainingOutput, TextJepaPredictor

__version__ = "0.1.0"

AutoConfig.register("textjepa", TextJepaConfig, exist_ok=True)
AutoModel.register(TextJepaConfig, TextJepaModel, exist_ok=True)
AutoModelForSequenceClassification.register(TextJepaConfig, TextJepaForSequenceClassification, exist_ok=True)
AutoModelForPreTraining.register(TextJepaConfig, TextJepaForPreTraining, exist_ok=True)

__all__ = [
    "TextJepaConfig",
    "TextJepaModel",
    "TextJepaPredictor",
    "TextJepaPreTrainedModel",
    "TextJepaForPreTraining",
    "TextJepaForPreTrainingOutput",
    "TextJepaForSequenceClassification",
    "pool_hidden_states",
]
