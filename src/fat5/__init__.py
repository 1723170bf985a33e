"""fat5: Flash Attention T5. Fast T5/UL2 pretraining, finetuning and serving."""

from . import auto as _auto
from .config import PRESETS, FAT5Config
from .heads import FAT5ForQuestionAnswering, FAT5ForSequenceClassification, FAT5ForTokenClassification
from .model import FAT5EncoderModel, FAT5ForConditionalGeneration, FAT5PreTrainedModel

_auto.register()  # AutoConfig / AutoModel* know "fat5" once fat5 is imported

__all__ = [
    "FAT5Config",
    "PRESETS",
    "FAT5ForConditionalGeneration",
    "FAT5EncoderModel",
    "FAT5PreTrainedModel",
    "FAT5ForSequenceClassification",
    "FAT5ForTokenClassification",
    "FAT5ForQuestionAnswering",
]
__version__ = "0.1.0"
