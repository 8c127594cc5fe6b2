"""Corpora load and split deterministically; a step's global batch depends on (seed, step) only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError, DataConfig
from orchestrator.data import BatchStream, global_offsets, load_corpus, stdlib_documents


def test_stdlib_corpus_is_split_by_document_and_deterministic():
    cfg = DataConfig(max_bytes=3_000_000, val_fraction=0.05)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert len(stdlib_documents()) > 500
    total = len(a.train) + len(a.val)
    assert 2_900_000 < total <= 3_000_000 + 2 * len(stdlib_documents())  # separators between documents
    assert 0.005 < len(a.val) / total < 0.2
    assert b"def " in a.train[:200_000].tobytes()


def test_text_file_folder_and_token_files(tmp_path):
    text = ("the quick brown fox jumps over the lazy dog\n" * 400).encode()
    (tmp_path / "one.txt").write_bytes(text)
    c = load_corpus(DataConfig(path=str(tmp_path / "one.txt"), seq_len=16, val_fraction=0.1))
    assert len(c.train) == int(len(text) * 0.9) and c.train.dtype == np.uint8
    assert c.train.tobytes() + c.val.tobytes() == text

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i}.md").write_bytes(f"document {i} ".encode() * 50)
    c = load_corpus(DataConfig(path=str(folder), seq_len=16, val_fraction=0.2))
    assert len(c.val) > 0 and b"document" in c.val.tobytes()

    tokens = (np.arange(5000) % 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "data.bin")
    c = load_corpus(DataConfig(path=str(tmp_path / "data.bin"), seq_len=16, val_fraction=0.1))
    assert c.train.dtype == np.uint16 and np.array_equal(np.concatenate([c.train, c.val]), tokens)
    with pytest.raises(ConfigError, match="holds token id 999, but model.vocab_size=256"):
        c.check_vocab(256, "data.bin")
    c.check_vocab(1000, "data.bin")

    nano = tmp_path / "nano"
    nano.mkdir()
    tokens[:4000].tofile(nano / "train.bin")
    tokens[4000:].tofile(nano / "val.bin")
    c = load_corpus(DataConfig(path=str(nano), seq_len=16))
    assert len(c.train) == 4000 and len(c.val) == 1000


def test_too_little_data_is_a_clear_error(tmp_path):
    (tmp_path / "small.txt").write_text("hello")
    with pytest.raises(ConfigError, match="fewer than data.seq_len"):
        load_corpus(DataConfig(path=str(tmp_path / "small.txt"), seq_len=64))


def test_global_batch_is_a_function_of_seed_and_step_and_slices_cover_it():
    tokens = np.random.default_rng(0).integers(0, 256, 10_000).astype(np.uint8)
    assert np.array_equal(global_offsets(3, 17, len(tokens), 32, 8), global_offsets(3, 17, len(tokens), 32, 8))
    assert not np.array_equal(global_offsets(3, 17, len(tokens), 32, 8), global_offsets(3, 18, len(tokens), 32, 8))
    assert not np.array_equal(global_offsets(3, 17, len(tokens), 32, 8), global_offsets(4, 17, len(tokens), 32, 8))
    whole_x, whole_y = BatchStream(tokens, tokens, 3, 32, 8, world=1, rank=0).train_batch(17)
    assert torch.equal(whole_x[:, 1:], whole_y[:, :-1])
    for world in (2, 4, 8):
        parts = [BatchStream(tokens, tokens, 3, 32, 8, world, rank).train_batch(17) for rank in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), whole_y)
