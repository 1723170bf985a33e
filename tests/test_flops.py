"""The MFU numerator counts the matmul weights the model really has."""

import pytest
from torch import nn

from fat5 import FAT5Config, FAT5ForConditionalGeneration
from fat5.flops import step_flops


def linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_dense_flops_match_the_model_weights(ff):
    c = FAT5Config.from_preset("tiny", feed_forward_proj=ff, num_layers=3, num_decoder_layers=2)
    model = FAT5ForConditionalGeneration(c)
    b, le, ld = 3, 40, 24
    dense = 6 * (
        linear_params(model.encoder) * b * le
        + (linear_params(model.decoder) + c.vocab_size * c.d_model) * b * ld
    )
    hd = c.num_heads * c.d_kv
    attn = 3 * 4 * b * hd * (c.num_layers * le * le + c.num_decoder_layers * (ld * ld / 2 + ld * le))
    assert step_flops(c, b, le, ld) == pytest.approx(dense + attn, rel=1e-12)
