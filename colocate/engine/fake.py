"""A deterministic stand-in for the target, for tests of the ring and training plumbing.

Features are a pure function of (seed, token id, position, layer): a seeded token table plus
a sinusoidal position code plus a per-layer offset. Tokens never see each other (no
attention), so a feature can be recomputed from its own token alone; that is what makes the
fake useful as a reference on the far side of the ring.
"""

from __future__ import annotations

import math

import torch

from colocate.engine.base import TargetEngine, resolve_aux_layer_ids


class FakeEngine(TargetEngine):
    def __init__(self, hidden_size: int, num_layers: int, vocab_size: int,
                 aux_layer_ids: list[int] | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", seed: int = 0):
        self._hidden_size = hidden_size
        self._num_layers = num_layers
        self._vocab_size = vocab_size
        self._aux_layer_ids = resolve_aux_layer_ids(aux_layer_ids, num_layers)
        self._dtype = dtype
        self._device = torch.device(device)
        # Drawn on the CPU so the values do not depend on the device's generator.
        gen = torch.Generator().manual_seed(seed)
        self.token_table = torch.randn(vocab_size, hidden_size, generator=gen).to(self._device)
        # One offset per layer output, plus one for the final norm (index num_layers).
        self.layer_offsets = torch.randn(num_layers + 1, hidden_size,
                                         generator=gen).to(self._device)


    def features(self, input_ids: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux [T, num_aux * H], last [T, H]) in `dtype`: the reference for tests."""
        base = self.token_table[input_ids] + self._position_code(positions)
        aux = torch.cat([base + self.layer_offsets[i] for i in self._aux_layer_ids], dim=-1)
        last = torch.nn.functional.layer_norm(base + self.layer_offsets[-1], (self.hidden_size,))
        return aux.to(self.dtype), last.to(self.dtype)

    def _position_code(self, positions: torch.Tensor) -> torch.Tensor:
        half = (self.hidden_size + 1) // 2
        freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32)
                          * (-math.log(10000.0) / half))
        angles = positions.to(torch.float32)[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :self.hidden_size]

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                 aux_out: torch.Tensor, last_out: torch.Tensor | None) -> None:
        aux, last = self.features(input_ids, positions)
        aux_out.copy_(aux)
        if last_out is not None:
            last_out.copy_(last)
