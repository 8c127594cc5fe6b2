"""Data for post-training Hugging Face models: tokenizers, local files through `datasets`, SFT rows.

The oracle for the SFT rows is a transformers causal LM run on each conversation alone, unpadded.
"""
from __future__ import annotations

import ast
import json

import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError
from orchestrator.data import hf_data
from orchestrator.data.hf_data import (cache_folder, load_pretraining_corpus, load_sft_samples, stdlib_instructions,
                                       write_jsonl)
from orchestrator.data.sft import IGNORE, SFTBatchStream, tokenize_conversations
from orchestrator.data.tokenizer import END_OF_TURN, load_tokenizer, train_tokenizer

WORDS = ("alpha beta gamma delta the fox jumps over lazy dog def return value list print sort key "
         "numbers add one two three").split()


def _text(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def _conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        turns = [{"role": "system", "content": _text(rng, 2)}] if rng.random() < 0.5 else []
        for _ in range(int(rng.integers(1, 3))):
            turns += [{"role": "user", "content": _text(rng, int(rng.integers(1, 5)))},
                      {"role": "assistant", "content": _text(rng, int(rng.integers(1, 6)))}]
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [m["content"] for c in _conversations(40, seed=1) for m in c] + ["x = [1, 2]\n    return x"]
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


def test_sft_labels_are_exactly_the_assistant_turns_and_their_end_of_turn_token(tok):
    conversation = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": "add one two"},
                    {"role": "assistant", "content": "three"},
                    {"role": "user", "content": " sort the list\n"},
                    {"role": "assistant", "content": "  def sort(key):\n    return list"}]
    samples = tokenize_conversations([conversation], tok)
    stream = SFTBatchStream(samples, seed=0, seq_len=64, global_batch_size=1, world=1, rank=0, pack=False,
                            val_fraction=0.0)
    inputs, labels, positions = (t[0] for t in stream.train_batch(0))
    n = len(samples.tokens) - 1
    assert n < 64 and positions.tolist() == list(range(64))
    assert inputs[:n].tolist() == samples.tokens[:-1].tolist()   # shifted: inputs[t] -> labels[t] = token t+1
    trained_at = torch.nonzero(labels != IGNORE).flatten().tolist()
    assert all(labels[t] == samples.tokens[t + 1] for t in trained_at)
    runs = np.split(trained_at, np.flatnonzero(np.diff(trained_at) > 1) + 1)
    assert [tok.decode(labels[r].tolist()) for r in runs] == [
        "three" + END_OF_TURN, "  def sort(key):\n    return list" + END_OF_TURN]
    assert stream.loss_tokens(0) == len(trained_at)
    assert (labels[n:] == IGNORE).all()


def _summed_ce(model, inputs, labels, **kwargs) -> torch.Tensor:
    logits = model(input_ids=inputs, **kwargs).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                             reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_rows_give_the_loss_of_the_samples_run_one_by_one(tok, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, attn_implementation=attn)).double().eval()
    samples = tokenize_conversations(_conversations(12), tok)
    T = 96
    assert np.diff(samples.offsets).max() <= T + 1          # no truncation: the oracle runs whole samples
    rows = {p: len(SFTBatchStream(samples, 0, T, 1, 1, 0, p, val_fraction=0.0).train) for p in (False, True)}
    packed = SFTBatchStream(samples, 0, T, rows[True], 1, 0, True, val_fraction=0.0)
    unpacked = SFTBatchStream(samples, 0, T, rows[False], 1, 0, False, val_fraction=0.0)
    assert rows[False] == len(samples) and rows[True] < rows[False] / 2      # step 0 = one epoch, packed
    assert sorted(packed.samples_in(0)) == sorted(unpacked.samples_in(0)) == list(range(len(samples)))

    oracle, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for i in range(len(samples)):
            tokens, trained = samples.sample(i)
            tokens = tokens.astype(np.int64)
            x = torch.tensor(tokens[:-1], dtype=torch.int64)[None]
            y = torch.tensor(np.where(trained[1:], tokens[1:], IGNORE), dtype=torch.int64)[None]
            oracle += _summed_ce(model, x, y)
            count += int(trained[1:].sum())
        x, y, pos = packed.train_batch(0)
        assert ((pos[:, 1:] == 0).sum(1) >= 2).any()       # some row holds 3+ samples, positions restarting
        packed_loss = _summed_ce(model, x, y, position_ids=pos, use_cache=False)
        leaky_loss = _summed_ce(model, x, y, position_ids=pos)   # default use_cache=True: an empty DynamicCache
        ux, uy, upos = unpacked.train_batch(0)
        unpacked_loss = _summed_ce(model, ux, uy, position_ids=upos, use_cache=False)
    assert packed.loss_tokens(0) == unpacked.loss_tokens(0) == count == int((y != IGNORE).sum())
    torch.testing.assert_close(packed_loss, oracle, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(unpacked_loss, oracle, rtol=1e-12, atol=1e-10)
    # with a cache object transformers skips packed-sequence detection: samples in a row attend to each other
    assert abs(leaky_loss.item() - oracle.item()) > 1e-6


@pytest.mark.parametrize("pack", [False, True])
def test_a_steps_batch_depends_on_seed_and_step_only_and_splits_over_devices(tok, pack):
    samples = tokenize_conversations(_conversations(30, seed=2), tok)
    T, B = 32, 4
    one, again = (SFTBatchStream(samples, 7, T, B, 1, 0, pack, val_fraction=0.2) for _ in range(2))
    halves = [SFTBatchStream(samples, 7, T, B, 2, r, pack, val_fraction=0.2) for r in range(2)]
    epochs = set()
    for step in range(8):                                   # crosses epoch boundaries
        whole = one.train_batch(step)
        for a, b in zip(whole, again.train_batch(step)):
            assert torch.equal(a, b)
        parts = [h.train_batch(step) for h in halves]
        for k in range(3):
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
        assert one.loss_tokens(step) == halves[1].loss_tokens(step) == int((whole[1] != IGNORE).sum()) > 0
        epochs.add(step * B // len(one.train))
    assert len(epochs) > 1
    assert not torch.equal(one.train_batch(0)[0], SFTBatchStream(samples, 8, T, B, 1, 0, pack, 0.2).train_batch(0)[0])
    val_samples = {int(one.val.sample_ids[i]) for r in one.val.rows for i in r}
    train_samples = {int(one.train.sample_ids[i]) for r in one.train.rows for i in r}
    assert val_samples and not val_samples & train_samples
    v = one.val_batch(1)
    assert torch.equal(torch.cat([h.val_batch(1)[1] for h in halves]), v[1])
    assert one.val_loss_tokens(1) == int((v[1] != IGNORE).sum())


def _records(n: int) -> list[dict]:
    return [{"messages": c, "id": i} for i, c in enumerate(_conversations(n, seed=3))]


def test_jsonl_parquet_and_a_folder_give_the_same_samples_and_the_cache_is_reused_until_the_file_changes(
        tok, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = _records(6)
    jsonl = write_jsonl(records, tmp_path / "chat.jsonl")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "chat.parquet")
    write_jsonl(records[:2], tmp_path / "folder" / "a.jsonl")
    write_jsonl(records[2:], tmp_path / "folder" / "b.jsonl")
    expected = tokenize_conversations([r["messages"] for r in records], tok)
    for path in (jsonl, tmp_path / "chat.parquet", tmp_path / "folder"):
        got = load_sft_samples(path, tok)
        for field in ("tokens", "trained", "offsets"):
            assert np.array_equal(getattr(got, field), getattr(expected, field)), (path, field)

    folder = cache_folder(jsonl, tok, "sft")
    assert folder.parent == tmp_path and folder.name.startswith("chat.jsonl.tok-")
    written = (folder / "meta.json").stat().st_mtime_ns
    monkeypatch.setattr(hf_data, "_read_records", lambda *a: pytest.fail("read the data again"))
    assert len(load_sft_samples(jsonl, tok)) == 6
    assert (folder / "meta.json").stat().st_mtime_ns == written
    monkeypatch.undo()

    write_jsonl(_records(7), jsonl)                         # changed: a new cache, the old one removed
    assert len(load_sft_samples(jsonl, tok)) == 7
    assert cache_folder(jsonl, tok, "sft") != folder and not folder.exists()
    assert sorted(p.name.split(".tok-")[0] for p in tmp_path.glob("*.tok-*")) == ["chat.jsonl", "chat.parquet",
                                                                                 "folder"]


def test_pretraining_documents_become_eos_separated_tokens_from_text_or_jsonl(tok, tmp_path):
    rng = np.random.default_rng(4)
    docs = [_text(rng, int(rng.integers(3, 30))) + ("\n" if i % 3 else "") for i in range(40)]
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"doc{i:02d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "txt" / f"doc{i:02d}.txt").write_text(d)
    write_jsonl([{"text": d} for d in docs], tmp_path / "docs.jsonl")
    a = load_pretraining_corpus(tmp_path / "txt", tok, val_fraction=0.2)
    b = load_pretraining_corpus(tmp_path / "docs.jsonl", tok, val_fraction=0.2)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train.dtype == np.uint16 and len(a.val) > 0
    eos = tok.eos_token_id
    decoded = []
    for split in (a.train, a.val):
        assert split[-1] == eos
        cuts = np.flatnonzero(split == eos)
        decoded += [tok.decode(d.tolist()) for d in np.split(split, cuts + 1)[:-1]]
        assert (np.diff(np.concatenate([[-1], cuts])) > 1).all()   # eos once per document, nothing else
    assert sorted(d.removesuffix(tok.eos_token) for d in decoded) == sorted(docs)


def test_missing_or_unreadable_data_and_missing_columns_are_config_errors_naming_the_path(tok, tmp_path):
    with pytest.raises(ConfigError, match="nope.jsonl"):
        load_sft_samples(tmp_path / "nope.jsonl", tok)
    write_jsonl([{"text": "alpha"}], tmp_path / "plain.jsonl")
    with pytest.raises(ConfigError, match=r"plain\.jsonl.*no 'messages' column \(columns: text\)"):
        load_sft_samples(tmp_path / "plain.jsonl", tok)
    write_jsonl([{"messages": "x"}], tmp_path / "chat.jsonl")
    with pytest.raises(ConfigError, match=r"no 'text' column"):
        load_pretraining_corpus(tmp_path / "chat.jsonl", tok)
    (tmp_path / "broken.jsonl").write_text('{"messages": [\n')
    with pytest.raises(ConfigError, match=r"cannot read .*broken\.jsonl as json"):
        load_sft_samples(tmp_path / "broken.jsonl", tok)
    assert not list(tmp_path.glob("*.tok-*")) and not list(tmp_path.glob("*.partial-*"))


def test_train_tokenizer_reuses_a_folder_trained_from_the_same_inputs(tmp_path):
    texts = ["alpha beta gamma"] * 5 + ["the fox jumps over the lazy dog"] * 3
    first = train_tokenizer(texts, 280, tmp_path / "t")
    stamp = (tmp_path / "t" / "tokenizer.json").stat().st_mtime_ns
    again = train_tokenizer(iter(texts), 280, tmp_path / "t")    # any iterable
    assert (tmp_path / "t" / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again.get_vocab() == first.get_vocab() and len(first) == 280
    assert "{% generation %}" in json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())["chat_template"]
    loaded = load_tokenizer(tmp_path / "t")
    assert loaded.chat_template == first.chat_template and "{% generation %}" in loaded.chat_template
    assert loaded.decode(loaded("the lazy fox")["input_ids"]) == "the lazy fox"
    other = train_tokenizer(texts, 290, tmp_path / "t")           # another vocab_size: retrained
    assert len(other) == 290 and (tmp_path / "t" / "tokenizer.json").stat().st_mtime_ns != stamp
    changed = train_tokenizer(texts + ["numbers one two three"], 290, tmp_path / "t")
    assert changed.get_vocab() != other.get_vocab()
    with pytest.raises(ConfigError, match="vocab_size=100"):
        train_tokenizer(texts, 100, tmp_path / "small")


def test_stdlib_instructions_are_short_documented_functions_in_a_fixed_order(tmp_path):
    first = stdlib_instructions(6, cache_dir=tmp_path)
    assert first == stdlib_instructions(6, cache_dir=tmp_path) == stdlib_instructions(6)
    assert len(first) == 6 and len(list(tmp_path.glob("stdlib_instructions-*.jsonl"))) == 1
    for record in first:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant") and len(assistant["content"]) < 1200
        fn = next(n for n in ast.parse(assistant["content"]).body if isinstance(n, ast.FunctionDef))
        assert user["content"].startswith(f"Write a Python function `{fn.name}(")
        assert user["content"].endswith(ast.get_docstring(fn))
    assert json.loads((next(tmp_path.glob("*.jsonl"))).read_text().splitlines()[0]) == first[0]
