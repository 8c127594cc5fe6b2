"""Token corpora: the embedded stdlib corpus, user text, and nanoGPT-style uint16 token files.

Text is byte-level (token = byte value, vocabulary 256). A corpus of many documents is split into
train/validation by a stable hash of each document's relative path, so no document straddles the
split and the split never depends on file order; a single document or token file is split at a
fixed tail fraction. A folder holding `train.bin` (and optionally `val.bin`) is taken as it is.
"""
from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.config import ConfigError, DataConfig, reads_token_files

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini",
                 ".html", ".css", ".js", ".sh", ".tex", ".csv"}
DOC_SEPARATOR = b"\n\n"


@dataclass
class Corpus:
    train: np.ndarray            # 1-D token array (uint8 for bytes, uint16 for token files)
    val: np.ndarray
    description: str

    @property
    def max_token(self) -> int:
        return int(max(self.train.max(initial=0), self.val.max(initial=0)))

    def check_vocab(self, vocab_size: int, path: str | None) -> None:
        """ConfigError naming the split, the first id out of range and its 1-based position (the driver checks
        token files, naming each, before Ray starts: check_token_ids)."""
        for name, split in (("training", self.train), ("validation", self.val)):
            if int(split.max(initial=0)) >= vocab_size:
                at = int(np.argmax(split >= vocab_size))
                raise ConfigError(f"data.path={path!r} holds token id {self.max_token}, but model.vocab_size="
                                  f"{vocab_size} (the first id out of range: token {at + 1:,} of the {name} split of "
                                  f"{self.description}, id {int(split[at])}); raise model.vocab_size above "
                                  f"{self.max_token}, or use data of that vocabulary")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[Path]:
    """The standard library's own .py files (installed third-party packages excluded), sorted."""
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def load_corpus(cfg: DataConfig) -> Corpus:
    if cfg.path is None:
        root = stdlib_root()
        return _from_documents(root, stdlib_documents(), cfg, f"Python {root.name} standard library at {root}")
    path = Path(cfg.path).expanduser()
    if reads_token_files(cfg):
        return _from_token_files(path, cfg)
    if path.is_dir():
        docs = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not docs:
            raise ConfigError(f"data.path={cfg.path!r} is a folder with no text files "
                              f"(looked for {', '.join(sorted(TEXT_SUFFIXES))})")
        return _from_documents(path, docs, cfg, f"text folder {path} ({len(docs)} files)")
    data = np.frombuffer(_read_capped(path, cfg.max_bytes), dtype=np.uint8)
    return _tail_split(data, cfg, f"text file {path}")


def token_files(cfg: DataConfig) -> list[Path]:
    """The uint16 token files load_corpus reads for `cfg` (none for text): the file, or a folder's train.bin and
    its val.bin when there is one."""
    if not reads_token_files(cfg):   # (also: no data.path)
        return []
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        return [path / "train.bin"] + ([path / "val.bin"] if (path / "val.bin").is_file() else [])
    return [path]


def check_token_ids(cfg: DataConfig, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Every id of the token files below `vocab_size`, read through a memmap a chunk at a time. Raises
    ConfigError naming the file, the first id out of range, its 1-based position and the fix."""
    for f in token_files(cfg):
        tokens = _memmap_tokens(f, cfg)
        for start in range(0, len(tokens), chunk):
            part = tokens[start: start + chunk]
            if int(part.max(initial=0)) >= vocab_size:
                at = int(np.argmax(part >= vocab_size))
                top = max(int(tokens[i: i + chunk].max()) for i in range(start, len(tokens), chunk))
                raise ConfigError(f"data.path={cfg.path!r}: {f} holds token id {int(part[at])} at token "
                                  f"{start + at + 1:,} (of {len(tokens):,}), but model.vocab_size={vocab_size} "
                                  f"(ids 0..{vocab_size - 1}); raise model.vocab_size above {top} (its largest "
                                  f"id), or use token files of the model's vocabulary")


def _read_capped(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(max_bytes or -1)


def _from_documents(root: Path, docs: list[Path], cfg: DataConfig, description: str) -> Corpus:
    train, val, total = [], [], 0
    threshold = int(cfg.val_fraction * 10_000)
    for doc in docs:
        raw = doc.read_bytes()
        if cfg.max_bytes and total + len(raw) > cfg.max_bytes:
            raw = raw[: cfg.max_bytes - total]
        total += len(raw)
        rel = doc.relative_to(root).as_posix()
        (val if zlib.crc32(rel.encode()) % 10_000 < threshold else train).append(raw)
        if cfg.max_bytes and total >= cfg.max_bytes:
            break
    if len(train) == 0 or len(val) == 0:  # too few documents for a per-document split
        return _tail_split(np.frombuffer(DOC_SEPARATOR.join(train + val), dtype=np.uint8), cfg, description)
    return _checked(np.frombuffer(DOC_SEPARATOR.join(train), dtype=np.uint8),
                    np.frombuffer(DOC_SEPARATOR.join(val), dtype=np.uint8), cfg, description)


def _from_token_files(path: Path, cfg: DataConfig) -> Corpus:
    if path.is_dir():
        train = _memmap_tokens(path / "train.bin", cfg)
        if (path / "val.bin").is_file():
            return _checked(train, _memmap_tokens(path / "val.bin", cfg), cfg, f"token files in {path}")
        return _tail_split(train, cfg, f"token file {path / 'train.bin'}")
    return _tail_split(_memmap_tokens(path, cfg), cfg, f"token file {path}")


def _memmap_tokens(path: Path, cfg: DataConfig) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(f"data.path={cfg.path!r}: expected token file {path} does not exist")
    if path.stat().st_size % 2:
        raise ConfigError(f"data.path={cfg.path!r}: {path} has an odd number of bytes; a uint16 token file "
                          f"(nanoGPT .bin) holds 2 bytes per token")
    if path.stat().st_size == 0:   # numpy cannot map an empty file; the split-length check names it
        return np.zeros(0, np.uint16)
    return np.asarray(np.memmap(path, dtype=np.uint16, mode="r"))


def _tail_split(data: np.ndarray, cfg: DataConfig, description: str) -> Corpus:
    cut = int(len(data) * (1.0 - cfg.val_fraction))
    return _checked(data[:cut], data[cut:], cfg, description)


def _checked(train: np.ndarray, val: np.ndarray, cfg: DataConfig, description: str) -> Corpus:
    for name, split in (("train", train), ("validation", val)):
        if len(split) < cfg.seq_len + 2:
            raise ConfigError(f"data.path={cfg.path!r}: the {name} split of {description} has {len(split)} tokens, "
                              f"fewer than data.seq_len+2={cfg.seq_len + 2}; use more data, a shorter data.seq_len "
                              f"or a different data.val_fraction")
    return Corpus(train=train, val=val, description=description)
