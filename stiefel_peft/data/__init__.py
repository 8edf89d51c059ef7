"""The built-in offline model and data (``assets``), task data from files (``files``),
generative classification for causal LMs (``tasks``, ``scoring``) and the training loss
(``loss``)."""

from stiefel_peft.data.assets import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    MissingAssetError,
    cache_dir,
    load_dataset,
    load_model,
    load_rotten_tomatoes,
    load_smollm2,
    smollm2_folder,
)
from stiefel_peft.data.files import (
    load_classification_file,
    load_prompt_completion_file,
    read_records,
)
from stiefel_peft.data.loss import accepts_logits_to_keep, supervised_loss
from stiefel_peft.data.scoring import classification_accuracy, label_scores, predict_labels
from stiefel_peft.data.tasks import (
    DEFAULT_MAX_LENGTH,
    IGNORE_INDEX,
    SENTIMENT_LABEL_NAMES,
    SENTIMENT_TEMPLATE,
    Encoded,
    TaskCollator,
    collate,
    encode_classification,
    encode_prompt_completion,
    label_words_for,
    split_examples,
    to_prompt_completion,
)

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "DEFAULT_MAX_LENGTH",
    "IGNORE_INDEX",
    "SENTIMENT_LABEL_NAMES",
    "SENTIMENT_TEMPLATE",
    "Encoded",
    "MissingAssetError",
    "TaskCollator",
    "accepts_logits_to_keep",
    "cache_dir",
    "classification_accuracy",
    "collate",
    "encode_classification",
    "encode_prompt_completion",
    "label_scores",
    "label_words_for",
    "load_classification_file",
    "load_dataset",
    "load_model",
    "load_prompt_completion_file",
    "load_rotten_tomatoes",
    "load_smollm2",
    "predict_labels",
    "read_records",
    "smollm2_folder",
    "split_examples",
    "supervised_loss",
    "to_prompt_completion",
]
