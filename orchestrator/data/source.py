"""What a run trains on: bytes of text (corpus.py), text tokenized by a tokenizer (hf_data.py), or conversations
for supervised fine-tuning (sft.py); and each device's stream of batches over it.

    data.tokenizer        null: the checkpoint's own (model.hf_path holding tokenizer files), else bytes;
                          "bytes"; or a tokenizer folder
    data.train_tokenizer  V > 0: train a byte-level BPE of V tokens (tokenizers) on the run's training text,
                          cached under ~/.cache/orchestrator/tokenizers (or in data.tokenizer's folder)
    data.task             pretrain | sft (records with `messages`, loss on assistant tokens only)
    data.path             as before; for sft a jsonl / parquet / arrow file or folder with `messages`, or
                          null: the instruction set built from this machine's standard library
    data.pack             sft: pack short samples into rows (per-document position ids)

Everything here runs on the driver, before any actor: the devices get the token arrays (or the SFT samples)
through Ray's object store, as before.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Config, ConfigError, tokenizer_source
from orchestrator.data.batches import BatchStream
from orchestrator.data.corpus import Corpus, load_corpus

@dataclass
class SFTData:
    """Conversations for supervised fine-tuning: `train` holds every sample (SFTBatchStream splits off the
    validation samples by a hash of each), `val` is None."""
    train: Any                   # SFTSamples
    val: None
    description: str

    @property
    def max_token(self) -> int:
        return int(self.train.tokens.max(initial=0))

    def check_vocab(self, vocab_size: int, path: str | None) -> None:
        if self.max_token >= vocab_size:
            raise ConfigError(f"the SFT data ({path or 'the stdlib instruction set'}) holds token id {self.max_token}, "
                              f"but the model's vocabulary has {vocab_size}: use a tokenizer that fits the model")


def cache_root() -> Path:
    return Path(os.environ.get("ORCHESTRATOR_CACHE", "~/.cache/orchestrator")).expanduser()


def _training_texts(cfg: Config) -> list[str]:
    """The texts a tokenizer is trained on: the conversations' contents (sft) or the documents (pretrain)."""
    d = cfg.data
    if d.task == "sft":
        return [msg["content"] for conv in _conversations(cfg) for msg in conv]
    from orchestrator.data.hf_data import _read_records

    return [t for batch in _read_records(Path(d.path).expanduser(), "text") for t in batch]


def _conversations(cfg: Config) -> list[list[dict]]:
    from orchestrator.data.hf_data import _conversations as read, stdlib_instructions

    d = cfg.data
    if d.path is None:
        return [r["messages"] for r in stdlib_instructions(d.max_samples or 2000, cache_dir=cache_root() / "data")]
    convs = list(read(Path(d.path).expanduser()))
    return convs[: d.max_samples] if d.max_samples else convs


def resolve_tokenizer(cfg: Config):
    """The run's tokenizer (transformers), trained first when data.train_tokenizer asks; None for bytes."""
    from orchestrator.data.tokenizer import load_tokenizer, train_tokenizer

    d = cfg.data
    folder = tokenizer_source(cfg)
    if d.train_tokenizer:   # into data.tokenizer when it names a folder, else the cache (never a model's folder)
        texts = _training_texts(cfg)
        tag = hashlib.sha256(repr((d.task, d.path, d.max_samples, d.train_tokenizer)).encode()).hexdigest()[:12]
        out = Path(folder).expanduser() if folder else cache_root() / "tokenizers" / f"bpe{d.train_tokenizer}-{tag}"
        return train_tokenizer(texts, d.train_tokenizer, out)
    return load_tokenizer(folder) if folder else None


def load_data(cfg: Config, tokenizer: Any = "resolve") -> Corpus | SFTData:
    """The run's data (see the module docstring). Raises ConfigError naming the key or file."""
    d = cfg.data
    tok = resolve_tokenizer(cfg) if tokenizer == "resolve" else tokenizer
    if d.task == "rl":
        from orchestrator.data.rl import RLData

        return RLData.of(cfg)
    if d.task == "sft":
        from orchestrator.data.sft import tokenize_conversations
        from orchestrator.data.hf_data import load_sft_samples

        if d.path is None:
            samples = tokenize_conversations(_conversations(cfg), tok)
            what = f"{len(samples)} instructions built from this machine's standard library (docstring -> source)"
        else:
            samples = load_sft_samples(d.path, tok)
            if d.max_samples:
                samples = samples.subset(range(min(d.max_samples, len(samples))))
            what = f"{len(samples)} conversations from {d.path}"
        _check_splits(cfg, samples)
        return SFTData(samples, None, what)
    if tok is None:
        return load_corpus(d)
    from orchestrator.data.hf_data import load_pretraining_corpus

    return load_pretraining_corpus(d.path, tok, d.val_fraction)   # (data.path is set: validate refuses None)


def _check_splits(cfg: Config, samples: Any) -> None:
    """Here, before any actor: a training split with no sample that keeps an assistant token within
    data.seq_len, or an empty validation split when the run evaluates, is a ConfigError (not every actor's)."""
    from orchestrator.data.sft import SFTBatchStream

    stream = SFTBatchStream(samples, cfg.seed, cfg.data.seq_len, cfg.train.global_batch_size, 1, 0, cfg.data.pack,
                            cfg.data.val_fraction)
    if cfg.train.eval_batches and len(stream.val) == 0:
        raise ConfigError(f"the SFT validation split is empty ({len(samples)} samples, data.val_fraction="
                          f"{cfg.data.val_fraction}, data.seq_len={cfg.data.seq_len}): add samples, raise "
                          f"data.val_fraction, or set train.eval_batches=0")


def make_stream(cfg: Config, train: Any, val: Any, world: int, rank: int, pad_id: int = 0):
    """One device's batch stream: BatchStream over token arrays, SFTBatchStream over SFT samples. Both give
    train_batch(step) -> (inputs_BT, targets_BT[, position_ids_BT]) and loss_tokens(step)."""
    t = cfg.train
    if cfg.data.task == "rl":   # each step's batch comes from the rollouts (device/rl.py)
        return None
    if val is None:   # SFT samples
        from orchestrator.data.sft import SFTBatchStream

        return SFTBatchStream(train, cfg.seed, cfg.data.seq_len, t.global_batch_size, world, rank, cfg.data.pack,
                              cfg.data.val_fraction, pad_id)
    return BatchStream(train, val, cfg.seed, cfg.data.seq_len, t.global_batch_size, world, rank)
