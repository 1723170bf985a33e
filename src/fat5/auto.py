"""Registration of fat5 with the ``transformers`` Auto classes.

After ``register()`` (``import fat5`` calls it), a saved fat5 folder (``config.json`` with
``"model_type": "fat5"``) loads through the Auto classes in-process, with no ``trust_remote_code``:

  AutoConfig                          -> FAT5Config
  AutoModel, AutoModelForTextEncoding -> FAT5EncoderModel
  AutoModelForSeq2SeqLM               -> FAT5ForConditionalGeneration
  AutoModelForSequenceClassification  -> FAT5ForSequenceClassification
  AutoModelForTokenClassification     -> FAT5ForTokenClassification
  AutoModelForQuestionAnswering       -> FAT5ForQuestionAnswering

Limits: registration lives in the Python process, so fat5 must be installed and imported wherever such a
folder is loaded. Folders that plain ``transformers`` can load without fat5 are the ones written by
``fat5 convert --to-hf`` (T5 relative buckets with attention_scale 1.0 only; see ``fat5.hf``).
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTextEncoding,
    AutoModelForTokenClassification,
)

from .config import FAT5Config
from .heads import FAT5ForQuestionAnswering, FAT5ForSequenceClassification, FAT5ForTokenClassification
from .model import FAT5EncoderModel, FAT5ForConditionalGeneration

AUTO_CLASSES = (
    (AutoModel, FAT5EncoderModel),
    (AutoModelForTextEncoding, FAT5EncoderModel),
    (AutoModelForSeq2SeqLM, FAT5ForConditionalGeneration),
    (AutoModelForSequenceClassification, FAT5ForSequenceClassification),
    (AutoModelForTokenClassification, FAT5ForTokenClassification),
    (AutoModelForQuestionAnswering, FAT5ForQuestionAnswering),
)


def register() -> None:
    """Register FAT5Config and the fat5 models with the Auto classes. Safe to call any number of times."""
    AutoConfig.register(FAT5Config.model_type, FAT5Config, exist_ok=True)
    for auto_cls, model_cls in AUTO_CLASSES:
        auto_cls.register(FAT5Config, model_cls, exist_ok=True)
