"""The data section: what is read, how it is tokenized, the task (pretraining or SFT), and the rules that say
which tokenizer a run reads and whether data.path holds token files (orchestrator/data/ asks the same)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.config.base import ConfigError, Root, _Keys, _choice, _positive


@dataclass
class DataConfig:
    path: Optional[str] = None     # None: the Python standard library's own source files
    format: str = "auto"           # auto | text | bin (uint16 tokens, nanoGPT style)
    seq_len: int = 128
    val_fraction: float = 0.05
    max_bytes: int = 0             # cap on text bytes read (0: no cap)
    # Tokenizers and post-training (orchestrator/data/source.py): null = the checkpoint's own tokenizer when
    # model.hf_path holds one, else bytes; "bytes"; or a tokenizer folder. train_tokenizer=V trains a byte-level
    # BPE of V tokens on the run's training text first (cached). task: pretrain | sft (records with `messages`,
    # loss on assistant tokens only; data.path null = instructions built from the standard library). pack: sft
    # samples packed into rows with per-document position ids. max_samples: cap on sft samples (0: all).
    tokenizer: Optional[str] = None
    train_tokenizer: int = 0
    task: str = "pretrain"
    pack: bool = False
    max_samples: int = 0


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_source(cfg: Root) -> str | None:
    """The tokenizer folder a run reads (None: bytes, or one trained into the cache: data/source.py):
    data.tokenizer when it names a folder, else model.hf_path when that holds tokenizer files."""
    d, m = cfg.data, cfg.model
    if d.tokenizer == "bytes":
        return None
    if d.tokenizer:
        return d.tokenizer
    if m.hf_path and not d.train_tokenizer and any((Path(m.hf_path).expanduser() / f).is_file()
                                                   for f in TOKENIZER_FILES):
        return m.hf_path
    return None


def reads_token_files(d: DataConfig) -> bool:
    """Will data.path be read as uint16 token files (data.format, else a .bin file or a folder with train.bin)?
    orchestrator/data/corpus.py reads it so; the idle-key rules below ask the same."""
    if d.path is None:
        return False
    if d.format != "auto":
        return d.format == "bin"
    path = Path(d.path).expanduser()
    return path.suffix == ".bin" or (path.is_dir() and (path / "train.bin").is_file())


def _validate_tokens(cfg: Root, keys: _Keys) -> None:
    """The tokenizer, the task and packing (orchestrator/data/source.py)."""
    m, d = cfg.model, cfg.data
    _choice("data.task", d.task, ("pretrain", "sft", "rl"))
    _positive(cfg, ["data.train_tokenizer", "data.max_samples"], allow_zero=True)
    if d.task == "pretrain":
        keys.section(cfg, "data", ("pack", "max_samples"), "with data.task=pretrain (they shape SFT samples): "
                                                           "remove it, or set data.task=sft")
    folder = tokenizer_source(cfg)
    if folder is None and not d.train_tokenizer:   # bytes
        if d.task == "sft":
            raise ConfigError("data.task=sft renders conversations with a tokenizer's chat template: set data.tokenizer "
                              "to a tokenizer folder, or data.train_tokenizer to a vocabulary size to train one")
        if (d.path is None or d.format == "text") and m.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={m.vocab_size} is too small for byte-level text; it must be at "
                              f"least 256" + (" (the byte corpus needs 256 byte tokens; give data.tokenizer a tokenizer "
                                              "folder)" if m.hf_path or m.hf_config else ""))
        return
    if d.train_tokenizer and d.train_tokenizer > m.vocab_size:
        raise ConfigError(f"data.train_tokenizer={d.train_tokenizer} is larger than the model's vocabulary "
                          f"({m.vocab_size}): lower it, or raise the model's vocab_size")
    if folder is not None and not d.train_tokenizer and not Path(folder).expanduser().is_dir():
        raise ConfigError(f"data.tokenizer={folder!r} is not a folder; give a tokenizer folder (tokenizer.json, "
                          f"tokenizer_config.json), \"bytes\", or data.train_tokenizer=V to train one there")
    if d.task == "pretrain" and d.path is None:
        raise ConfigError("a tokenizer with the embedded corpus: the embedded corpus is byte-level; set data.path to "
                          "text / jsonl / parquet / arrow files, or data.tokenizer=bytes")
    if d.format != "auto":
        raise ConfigError(f"data.format={d.format!r} applies to byte-level data; with a tokenizer the files are read "
                          f"by their suffix (.txt .md .jsonl .json .parquet .arrow): remove it")
    if d.pack and not (m.hf_path or m.hf_config):
        raise ConfigError("data.pack=true needs position ids the native model does not take; pack with a "
                          "transformers model (model.hf_path / model.hf_config), or set data.pack=false")
