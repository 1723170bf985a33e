"""Generation on the Triton attention kernel (interpreter on CPU): static and dynamic caches, beams, every
position encoding, the same tokens as the reference path."""

import pytest
import torch

from fat5 import FAT5Config, FAT5ForConditionalGeneration, ops
from fat5.generation import generate


@pytest.fixture
def restore_backend():
    yield
    ops.set_backend("auto")


@pytest.mark.parametrize("pe", ["t5", "alibi", "rope", "fire"])
def test_kernel_generation_equals_reference(restore_backend, pe):
    cfg = FAT5Config.from_preset(
        "tiny", vocab_size=131, d_model=32, d_kv=16, d_ff=40, num_heads=2, num_layers=1, num_decoder_layers=1,
        position_encoding=pe, relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(2, 131, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ops.set_backend("reference")
    ref = generate(model, ids, mask, max_new_tokens=5, num_beams=2, cache_implementation="dynamic")
    ops.set_backend("triton")
    for cache in ("static", "dynamic"):
        out = generate(model, ids, mask, max_new_tokens=5, num_beams=2, cache_implementation=cache)
        assert torch.equal(out, ref), cache
