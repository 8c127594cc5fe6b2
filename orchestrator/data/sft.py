"""Supervised fine-tuning data: conversations -> token rows whose loss is on assistant tokens only.

Legend: B global batch (rows), T seq_len, S samples, R rows of an epoch (a row is one sample, or a pack).

A sample is a rendered conversation's tokens d_0..d_{L-1} and `trained`, which marks the assistant
content and its end-of-turn token. The sample occupies L-1 positions: inputs d_0..d_{L-2} and labels
d_1..d_{L-1}, a label being -100 where the token it names is not trained. So labels are shifted:
position t predicts labels[t]. A sample longer than T+1 tokens is truncated to T+1.

Rows: without packing, one sample per row, padded at the end (pad input, label -100, positions
continuing 0..T-1). With packing, samples are placed into rows of T positions (best fit, longest first,
ties in a seeded shuffle); each sample's positions restart at 0, and the padding at the end continues the
last sample's positions. transformers builds a block-diagonal causal mask from such position ids
(masking_utils.find_packed_sequence_indices) only when attention_mask is None and there is no cache: call
the model with `use_cache=False` (its default, config.use_cache=True, makes an empty DynamicCache and the
rows attend across samples).

Order: rows of an epoch are shuffled by np.random.default_rng([seed, epoch, 0x5F7]); global row g (step s,
j-th row: g = s*B + j) is row perm_{g // R}[g % R]. So a step's global batch is a pure function of (seed,
step) for a given data set and B; device `rank` of `world` takes rows [rank*B/world, (rank+1)*B/world).
Samples with no trained label (nothing to learn, or truncated away) are dropped, so every row has one.
"""
from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from orchestrator.config import ConfigError
from orchestrator.data.batches import device_slice
from orchestrator.data.tokenizer import has_generation_block, token_dtype

IGNORE = -100
_SALT = 0x5F7


@dataclass(frozen=True)
class SFTSamples:
    """Tokenized conversations, flat: sample i is tokens[offsets[i]:offsets[i+1]] (and trained[...])."""
    tokens: np.ndarray           # N token ids (uint16 or uint32)
    trained: np.ndarray          # N bool: the model learns to predict this token
    offsets: np.ndarray          # S+1 int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.trained[a:b]

    def subset(self, indices: Sequence[int]) -> "SFTSamples":
        parts = [self.sample(int(i)) for i in indices]
        lengths = np.array([len(t) for t, _ in parts], dtype=np.int64)
        return SFTSamples(np.concatenate([t for t, _ in parts]) if parts else self.tokens[:0],
                          np.concatenate([m for _, m in parts]) if parts else self.trained[:0],
                          np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def hashes(self) -> np.ndarray:
        """A stable hash of each sample's token ids (independent of their dtype and of the other samples)."""
        return np.array([zlib.crc32(np.asarray(self.sample(i)[0], dtype="<u4").tobytes())
                         for i in range(len(self))], dtype=np.int64)


def tokenize_conversations(conversations: Iterable[list[dict]], tokenizer, batch_size: int = 256) -> SFTSamples:
    """Render each conversation ([{role, content}, ...]) with the tokenizer's chat template, marking the
    tokens inside its `{% generation %}` blocks as trained."""
    if not has_generation_block(tokenizer):
        raise ConfigError("the tokenizer's chat template has no {% generation %} block, so assistant tokens "
                          "cannot be told apart; use a tokenizer whose template marks them (train_tokenizer does)")
    dtype = token_dtype(len(tokenizer))
    tokens, trained, lengths, batch = [], [], [], []

    def flush():
        try:
            out = tokenizer.apply_chat_template(batch, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        except Exception as e:  # the template refused one (jinja's TemplateError: an unknown role, ...): name it
            for i, conversation in enumerate(batch):
                try:
                    tokenizer.apply_chat_template(conversation, tokenize=False)
                except Exception as one:
                    n = len(lengths) + i + 1
                    roles = ", ".join(sorted({repr(m.get("role")) for m in conversation}))
                    raise ConfigError(f"conversation {n} (1-based, in data order; roles {roles}): the tokenizer's "
                                      f"chat template refuses it ({str(one).strip() or type(one).__name__}); change "
                                      f"its roles or remove it") from one
            raise e
        for ids, mask in zip(out["input_ids"], out["assistant_masks"]):
            tokens.append(np.asarray(ids, dtype=dtype))
            trained.append(np.asarray(mask, dtype=bool))
            lengths.append(len(ids))
        batch.clear()

    for conversation in conversations:
        batch.append(conversation)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return SFTSamples(np.concatenate(tokens) if tokens else np.zeros(0, dtype),
                      np.concatenate(trained) if trained else np.zeros(0, bool),
                      np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))


def split_samples(samples: SFTSamples, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation sample indices by a stable hash of each sample; validation gets the
    lowest-hash sample when the threshold leaves it empty (and val_fraction > 0)."""
    h = samples.hashes()
    is_val = h % 10_000 < int(round(val_fraction * 10_000))
    if val_fraction > 0 and not is_val.any() and len(samples) > 1:
        is_val[int(np.argmin(h))] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class _Rows:
    """The rows of one split: which samples each row holds, and its number of trained labels."""

    def __init__(self, samples: SFTSamples, indices: np.ndarray, seq_len: int, pack: bool, seed: int):
        starts = samples.offsets[indices]
        used = np.minimum(samples.offsets[indices + 1] - starts, seq_len + 1)   # tokens kept: positions + 1
        cum = np.concatenate([[0], np.cumsum(samples.trained, dtype=np.int64)])
        counts = cum[starts + used] - cum[np.minimum(starts + 1, starts + used)]   # trained labels d_1..d_used-1
        keep = (used >= 2) & (counts > 0)
        self.samples, self.seq_len = samples, seq_len
        self.starts, self.positions, counts = starts[keep], used[keep] - 1, counts[keep]
        order = np.random.default_rng([seed, _SALT]).permutation(len(self.starts))
        self.rows = _pack(self.positions, order, seq_len) if pack else [[int(i)] for i in order]
        self.loss_tokens = np.array([int(counts[r].sum()) for r in self.rows], dtype=np.int64)
        self.lengths = np.array([int(self.positions[r].sum()) for r in self.rows], dtype=np.int64)   # not padding
        self.sample_ids = np.asarray(indices)[keep]

    def __len__(self) -> int:
        return len(self.rows)

    def valid(self, row_ids: np.ndarray) -> torch.Tensor:
        return _valid(self.lengths[np.asarray(row_ids, dtype=np.int64)], self.seq_len)

    def build(self, row_ids: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = self.seq_len
        inputs_BT = np.full((len(row_ids), T), pad_id, dtype=np.int64)
        labels_BT = np.full((len(row_ids), T), IGNORE, dtype=np.int64)
        positions_BT = np.zeros((len(row_ids), T), dtype=np.int64)
        for b, r in enumerate(row_ids):
            at, start_of_last = 0, 0
            for i in self.rows[int(r)]:
                n, s = int(self.positions[i]), int(self.starts[i])
                tok = self.samples.tokens[s:s + n + 1].astype(np.int64)
                inputs_BT[b, at:at + n] = tok[:-1]
                labels_BT[b, at:at + n] = np.where(self.samples.trained[s + 1:s + n + 1], tok[1:], IGNORE)
                positions_BT[b, at:at + n] = np.arange(n)
                start_of_last, at = at, at + n
            positions_BT[b, at:] = np.arange(at - start_of_last, T - start_of_last)   # padding continues
        return torch.from_numpy(inputs_BT), torch.from_numpy(labels_BT), torch.from_numpy(positions_BT)


def _valid(lengths: np.ndarray, seq_len: int) -> torch.Tensor:
    return torch.from_numpy(np.arange(seq_len)[None, :] < lengths[:, None])


def _pack(positions: np.ndarray, order: np.ndarray, seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: longest sample first (ties in `order`), into the fullest row it fits in."""
    by_length = order[np.argsort(-positions[order], kind="stable")]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []         # (free positions, row), sorted
    for i in by_length:
        n = int(positions[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([int(i)])
            room, r = seq_len - n, len(rows) - 1
        else:
            room, r = free.pop(k)
            rows[r].append(int(i))
            room -= n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


class SFTBatchStream:
    """One device's view of SFT data: its slice of each step's global batch, as BatchStream for tokens.

    train_batch(step) and val_batch(index) give (inputs_BT, labels_BT, position_ids_BT), int64, for this
    device's rows; loss_tokens(step) is the number of trained labels in the whole global batch, the same
    on every device, to normalise a summed loss.
    """

    def __init__(self, samples: SFTSamples, seed: int, seq_len: int, global_batch_size: int, world: int,
                 rank: int, pack: bool, val_fraction: float = 0.05, pad_id: int = 0):
        if global_batch_size % world:
            raise ConfigError(f"train.global_batch_size={global_batch_size} is not a multiple of the "
                              f"{world} devices")
        self.seed, self.seq_len, self.global_batch_size, self.pack, self.pad_id = (
            seed, seq_len, global_batch_size, pack, pad_id)
        self.device_rows = device_slice(global_batch_size, world, rank)
        train_ids, val_ids = split_samples(samples, val_fraction)
        self.train = _Rows(samples, train_ids, seq_len, pack, seed)
        self.val = _Rows(samples, val_ids, seq_len, pack, seed)
        self._last_rows: tuple[int | None, np.ndarray] = (None, np.empty(0, dtype=np.int64))
        if len(self.train) == 0:
            raise ConfigError(f"no SFT training sample has an assistant token within data.seq_len={seq_len} "
                              f"({len(samples)} samples, {len(val_ids)} of them in validation)")

    def train_rows(self, step: int) -> np.ndarray:
        """The global batch of `step`: row ids (into self.train.rows), all B of them (the last step's kept: a
        step asks for its batch, mask and token counts)."""
        if self._last_rows[0] == step:
            return self._last_rows[1]
        self._last_rows = (step, self._draw_rows(step))
        return self._last_rows[1]

    def _draw_rows(self, step: int) -> np.ndarray:
        g = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)
        R = len(self.train)
        out = np.empty_like(g)
        for epoch in np.unique(g // R):
            at = g // R == epoch
            out[at] = np.random.default_rng([self.seed, int(epoch), _SALT]).permutation(R)[g[at] % R]
        return out

    def val_rows(self, index: int) -> np.ndarray:
        if len(self.val) == 0:
            raise ConfigError("the SFT validation split is empty; raise data.val_fraction or add samples")
        return (index * self.global_batch_size + np.arange(self.global_batch_size)) % len(self.val)

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.train.build(self.train_rows(step)[self.device_rows], self.pad_id)

    def val_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.val.build(self.val_rows(index)[self.device_rows], self.pad_id)

    def train_valid(self, step: int) -> torch.Tensor:
        """[B/world, T] bool for this device's rows of `step`: True where a sample's token is (not padding)."""
        return self.train.valid(self.train_rows(step)[self.device_rows])

    def val_valid(self, index: int) -> torch.Tensor:
        return self.val.valid(self.val_rows(index)[self.device_rows])

    def real_tokens(self, step: int) -> int:
        """Positions holding a sample's token in the whole global batch of `step` (padding excluded)."""
        return int(self.train.lengths[self.train_rows(step)].sum())

    def loss_tokens(self, step: int) -> int:
        return int(self.train.loss_tokens[self.train_rows(step)].sum())

    def val_loss_tokens(self, index: int) -> int:
        return int(self.val.loss_tokens[self.val_rows(index)].sum())

    def samples_in(self, step: int) -> list[int]:
        """Indices (into the samples given) of the samples in the global batch of `step`, row by row."""
        return [int(self.train.sample_ids[i]) for r in self.train_rows(step) for i in self.train.rows[int(r)]]
