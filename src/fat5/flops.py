"""Model FLOPs of one training step, the numerator of MFU (matmul FLOPs only, as in PaLM's MFU).

forward = 2 * (encoder matmul params) * B * L_enc
        + 2 * (decoder matmul params + output embedding) * B * L_dec
        + per layer attention: 4 * B * H * D * (L_enc^2 [enc self] + L_dec^2 / 2 [dec causal] + L_dec * L_enc [cross])
training step = 3 * forward (the backward is twice the forward). Counted on the padded batch shapes: what the
hardware computes. Both ``fat5 bench`` and the training loop's progress bar use this one formula.
"""

from __future__ import annotations

from .config import FAT5Config


def step_flops(c: FAT5Config, batch: int, l_enc: int, l_dec: int) -> float:
    d, f, h, dk = c.d_model, c.d_ff, c.num_heads, c.d_kv
    inner = h * dk
    ff = d * f * (3 if c.is_gated_act else 2)
    enc_layer = 4 * d * inner + ff
    dec_layer = 8 * d * inner + ff
    fwd = 2 * enc_layer * c.num_layers * batch * l_enc
    fwd += 2 * (dec_layer * c.num_decoder_layers + d * c.vocab_size) * batch * l_dec
    attn = 4 * batch * h * dk
    fwd += attn * c.num_layers * l_enc * l_enc
    fwd += attn * c.num_decoder_layers * (l_dec * l_dec / 2 + l_dec * l_enc)
    return 3.0 * fwd
