"""The data pipeline: text -> tokenizer -> pretokenized shards -> UL2 denoisers -> packed batches."""

from .corpus import TextSource, TokenDataset, builtin_corpus, open_source, prepare
from .packing import Packer, UL2Batches
from .tokenizer import load_tokenizer, mode_token_ids, sentinel_ids, train_tokenizer
from .ul2 import Denoiser, Mixture, denoise, max_piece_length, random_spans_noise_mask

__all__ = [
    "Denoiser",
    "Mixture",
    "Packer",
    "TextSource",
    "TokenDataset",
    "UL2Batches",
    "builtin_corpus",
    "denoise",
    "load_tokenizer",
    "max_piece_length",
    "mode_token_ids",
    "open_source",
    "prepare",
    "random_spans_noise_mask",
    "sentinel_ids",
    "train_tokenizer",
]
