"""Decoder key/value caches for incremental decoding.

The interface the model uses (``Attention`` and ``Stack``): ``offset`` (tokens already cached: the absolute
position of the next query), ``update(layer, k, v, key_padding_mask)`` -> the full keys, values and key mask,
``get_cross`` / ``set_cross`` (encoder keys/values, computed once per input), ``key_length(m)`` and
``advance(m)`` once per decoder pass. ``DynamicCache`` grows by concatenation (simple, any length).
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

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search)."""
        self.self_kv = {i: (k[index], v[index]) for i, (k, v) in self.self_kv.items()}
        self.cross_kv = {i: (k[index], v[index]) for i, (k, v) in self.cross_kv.items()}
        if self.key_mask is not None:
            self.key_mask = self.key_mask[index]
