"""The global batch of a step is a pure function of (seed, step); a device takes its slice of it.

`global_offsets(seed, step, ...)` draws the start of each of the B sequences of step `step` from a
generator seeded by (seed, step) alone. Device `rank` of `world` takes sequences
[rank*B/world, (rank+1)*B/world). So a run's data never depends on timing, on how many devices
there are, or on what happened before the step (resume and recovery need nothing but the step).
"""
from __future__ import annotations

import numpy as np
import torch

_TRAIN, _VAL = 0x7EA1, 0x0E7A1


def global_offsets(seed: int, step: int, num_tokens: int, seq_len: int, batch_size: int, split: int = _TRAIN
                   ) -> np.ndarray:
    rng = np.random.default_rng([seed, step, split])
    return rng.integers(0, num_tokens - seq_len - 1, size=batch_size, dtype=np.int64)


def device_slice(batch_size: int, world: int, rank: int) -> slice:
    per = batch_size // world
    return slice(rank * per, (rank + 1) * per)


def gather_sequences(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs_BT and targets_BT (targets shifted by one) as int64 tensors."""
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    seqs = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return seqs[:, :-1], seqs[:, 1:]


class BatchStream:
    """One device's view of the data: its slice of each step's global batch."""

    def __init__(self, train: np.ndarray, val: np.ndarray, seed: int, seq_len: int, global_batch_size: int,
                 world: int, rank: int):
        self.train, self.val = train, val
        self.seed, self.seq_len, self.global_batch_size = seed, seq_len, global_batch_size
        self.rows = device_slice(global_batch_size, world, rank)

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = global_offsets(self.seed, step, len(self.train), self.seq_len, self.global_batch_size)
        return gather_sequences(self.train, offsets[self.rows], self.seq_len)

    def loss_tokens(self, step: int) -> int:
        """Targets in the global batch of a step (every one is trained on)."""
        return self.global_batch_size * self.seq_len

    val_loss_tokens = loss_tokens

    def val_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = global_offsets(self.seed, index, len(self.val), self.seq_len, self.global_batch_size, _VAL)
        return gather_sequences(self.val, offsets[self.rows], self.seq_len)
