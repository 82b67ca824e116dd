"""A preallocated per-layer key/value cache for next-token(s) diffusion.

At inference the prefix (condition tokens, then the clean tokens of every finished AR step) never
changes while later steps are denoised, so its keys/values are computed once. For class
conditioning the cache needs no attention mask at all: the tokens being processed may see the
whole prefix and each other, which is exactly the generalized causal rule for both the noisy
tokens of the current step and the clean tokens of a step being appended. (Text prompts add one:
the null rows of a CFG batch must not see the prompt, see ``sampling_runners.Condition``.)

``write`` puts the new keys/values in the slots right after the prefix and returns views of
prefix + new (no ``torch.cat``): noisy tokens of the current step overwrite the same slots at
every diffusion step; ``commit(n)`` makes the last ``n`` written slots part of the prefix.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, max_len: int):
        self.num_layers, self.max_len = num_layers, max_len
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # committed prefix length

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, H, n, hd] -> keys/values of prefix + these n tokens, [B, H, length + n, hd]."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > preallocated {self.max_len}")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            # zeros, not empty: the compiled runner attends over every slot under a mask, and a masked
            # slot's value is still multiplied by its 0 weight, so NaN garbage there would give NaN
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        kc, vc = self.keys[layer], self.values[layer]
        if kc.shape[0] != k.shape[0]:
            raise ValueError(f"KV cache holds batch {kc.shape[0]}, got {k.shape[0]}")
        kc[:, :, self.length:end] = k
        vc[:, :, self.length:end] = v
        return kc[:, :, :end], vc[:, :, :end]

    def commit(self, n: int) -> None:
        """The last n written tokens become part of the prefix."""
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length + n} tokens > preallocated {self.max_len}")
        self.length += n

    def first_rows(self, rows: int) -> "KVCache":
        """A cache over the first ``rows`` batch rows, sharing this one's storage (the conditional half
        of a CFG batch at a step outside the guidance interval). Writes go to the shared tensors;
        ``commit`` on the view does not move this cache's prefix."""
        if any(k is None for k in self.keys):
            raise ValueError("first_rows needs a filled cache (write the prefix first)")
        view = KVCache(self.num_layers, self.max_len)
        view.keys = [k[:rows] for k in self.keys]
        view.values = [v[:rows] for v in self.values]
        view.length = self.length
        return view
