"""fat5: Flash Attention T5. Fast T5/UL2 pretraining, finetuning and serving."""

from .config import PRESETS, FAT5Config
from .model import FAT5EncoderModel, FAT5ForConditionalGeneration, FAT5PreTrainedModel

__all__ = ["FAT5Config", "PRESETS", "FAT5ForConditionalGeneration", "FAT5EncoderModel", "FAT5PreTrainedModel"]
__version__ = "0.1.0"
