"""Decoder key/value caches for incremental decoding.

The interface the model uses (``Attention`` and ``Stack``): ``offset`` (tokens already cached: the absolute
position of the next query), ``update(layer, k, v, key_padding_mask)`` -> the full keys, values and key mask,
``get_cross`` / ``set_cross`` (encoder keys/values, computed once per input), ``key_length(m)`` and
``advance(m)`` once per decoder pass; generation also uses ``reorder(index)`` (beam search).

Cross-attention keys/values come in two layouts: one row per decoder row (what a decoder pass given the
encoder states stores), or one row per input, shared by that input's ``r`` consecutive decoder rows (beams or
returned sequences: what generation stores; ``Attention`` then groups the r rows' queries). ``reorder`` moves
per-row ones with their rows and leaves per-input ones alone: beam search reorders rows only among the beams
of one input (row ``i`` takes a row of the same block ``i // r``), so shared encoder states stay valid.

- ``DynamicCache`` grows by concatenation: simple, any length, but every step allocates new tensors and the
  shapes change, so a decode step cannot be captured in a CUDA graph.
- ``StaticCache`` preallocates (B, H, max_len, D) buffers per layer and writes new positions with
  ``index_copy_`` at ``offset``, a 0-dim int64 tensor on the cache's device that ``advance`` increments in
  place. A decode step therefore has fixed shapes and fixed addresses and can be captured in a CUDA graph
  (replays advance the offset on the device). Attention always sees all ``max_len`` key slots; slots not yet
  written are masked by the key mask it returns (and by causality, since a query at position p only sees
  keys <= p). Limit: it holds at most ``max_len`` decoder tokens; a longer pass raises.
"""

from __future__ import annotations

import torch


class DynamicCache:
    def __init__(self) -> None:
        self.offset = 0
        self.self_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.key_mask: torch.Tensor | None = None
        self._pending_mask: torch.Tensor | None = None

    def key_length(self, m: int) -> int:
        return self.offset + m

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None):
        if layer in self.self_kv:
            pk, pv = self.self_kv[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.self_kv[layer] = (k, v)
        mask = self.key_mask
        if key_padding_mask is not None or mask is not None:
            b, n_new = k.shape[0], k.shape[2] - self.offset
            new = key_padding_mask if key_padding_mask is not None else k.new_ones(b, n_new, dtype=torch.bool)
            old = mask if mask is not None else k.new_ones(b, self.offset, dtype=torch.bool)
            mask = torch.cat([old, new.bool()], dim=1)
            self._pending_mask = mask
        return k, v, mask

    def get_cross(self, layer: int):
        return self.cross_kv.get(layer)

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cross_kv[layer] = (k, v)

    def advance(self, m: int) -> None:
        self.offset += m
        if self._pending_mask is not None:
            self.key_mask, self._pending_mask = self._pending_mask, None

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Select batch rows (beam search). Per-input cross keys/values (fewer rows than ``index``) are never
        touched: ``index`` must keep every row within its input's block (see the module docstring).
        ``cross=False`` keeps per-row ones as they are too (valid under the same condition)."""
        self.self_kv = {i: (k[index], v[index]) for i, (k, v) in self.self_kv.items()}
        if cross:
            rows = index.shape[0]
            self.cross_kv = {
                i: (k[index], v[index]) if k.shape[0] == rows else (k, v)
                for i, (k, v) in self.cross_kv.items()
            }
        if self.key_mask is not None:
            self.key_mask = self.key_mask[index]


class StaticCache:
    """Fixed-size cache for ``batch`` rows and up to ``max_len`` decoder tokens (see the module docstring)."""

    def __init__(
        self,
        batch: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if batch < 1 or num_layers < 1 or max_len < 1:
            raise ValueError(
                f"StaticCache needs batch, num_layers, max_len >= 1; got {batch}, {num_layers}, {max_len}"
            )
        shape = (batch, num_heads, max_len, head_dim)
        self.batch, self.max_len = batch, max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # key slot written and real
        self.offset = torch.zeros((), dtype=torch.long, device=device)
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slots = torch.arange(max_len, device=device)
        # host-side count of cached tokens, for the bounds check (a device-side overflow would be an opaque
        # CUDA assert); whoever replays a captured step must advance it with ``host_advance``
        self.host_offset = 0
        self._mask_written = False

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> StaticCache:
        c = model.config
        w = model.shared.weight
        return cls(batch, c.num_decoder_layers, c.num_heads, c.d_kv, max_len, w.dtype, w.device)

    def key_length(self, m: int) -> int:
        return self.max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None):
        b, _, m, _ = k.shape
        if b != self.batch:
            raise ValueError(f"StaticCache was built for batch {self.batch}, got keys for batch {b}")
        if self.host_offset + m > self.max_len:
            raise ValueError(
                f"StaticCache holds {self.max_len} decoder tokens; {self.host_offset} are cached and {m} more "
                "were given. Build it with a larger max_len."
            )
        idx = self.offset + self._slots[:m]  # device positions: no host sync, capturable
        kb, vb = self.keys[layer], self.values[layer]
        kb.index_copy_(2, idx, k.to(kb.dtype))
        vb.index_copy_(2, idx, v.to(vb.dtype))
        if not self._mask_written:  # once per pass: every layer sees the same positions
            new = (
                torch.ones(b, m, dtype=torch.bool, device=k.device)
                if key_padding_mask is None
                else key_padding_mask.bool()
            )
            self.valid.index_copy_(1, idx, new)
            self._mask_written = True
        return kb, vb, self.valid

    def get_cross(self, layer: int):
        return self.cross_kv.get(layer)

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the encoder keys/values; a later call with the same shapes copies into the same buffers, so
        a captured graph that reads them stays valid."""
        old = self.cross_kv.get(layer)
        if old is not None and old[0].shape == k.shape and old[1].shape == v.shape:
            old[0].copy_(k)
            old[1].copy_(v)
        else:
            self.cross_kv[layer] = (k.contiguous(), v.contiguous())

    def advance(self, m: int) -> None:
        self.offset.add_(m)
        self.host_advance(m)

    def host_advance(self, m: int) -> None:
        self.host_offset += m
        self._mask_written = False

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Select batch rows into the same buffers (addresses unchanged, so capturable too). Per-input cross
        keys/values (fewer than ``batch`` rows) are never touched, per-row ones only with ``cross=True``: as
        ``DynamicCache.reorder``."""
        for buf in (*self.keys, *self.values):
            buf.copy_(buf.index_select(0, index))
        self.valid.copy_(self.valid.index_select(0, index))
        if cross:
            for k, v in self.cross_kv.values():
                if k.shape[0] == self.batch:
                    k.copy_(k.index_select(0, index))
                    v.copy_(v.index_select(0, index))

    def reset(self) -> None:
        """Empty the cache (keeps the buffers and the encoder keys/values)."""
        self.offset.zero_()
        self.valid.zero_()
        self.host_offset = 0
        self._mask_written = False
