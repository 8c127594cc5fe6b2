"""Bad input is refused before Ray starts and before the run directory is made: one line naming the file, its
1-based line or record, the value and the fix, exit 2, no traceback (issue 19, item 2). A default that does not
apply to the chosen model resolves to what does; only keys the user set are refused, all at once (item 6)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import DEFAULT_CONFIG, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- tiny inputs
def _conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]}


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _sft_file(path: Path, record_31: dict) -> Path:
    """40 good conversations, the 31st (line 31) replaced."""
    records = [_conversation(i) for i in range(40)]
    records[30] = record_31
    return _jsonl(path, records)


def _token_folder(path: Path, bad: str) -> Path:
    """train.bin and val.bin of ids below 200; `bad` holds id 300 at its 124th token."""
    path.mkdir()
    for name, n in (("train.bin", 5000), ("val.bin", 1000)):
        tokens = (np.arange(n) % 200).astype(np.uint16)
        if name == bad:
            tokens[123] = 300
        tokens.tofile(path / name)
    return path


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    from tests.hf_tiny import make_tiny_hf

    out = tmp_path_factory.mktemp("mixtral")
    make_tiny_hf("mixtral", out)
    return out


# Transformers MoE models whose routers have no correction bias (what DeepSeek-V3's bias update moves) and that the
# project's own balancing losses cannot read: the default job's balancing does not apply to them.
def _save_config(kind: str, out: Path) -> Path:
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  max_position_embeddings=128, num_experts_per_tok=2)
    config = {"qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16,
                                                     num_experts=4, head_dim=8),
              "olmoe": lambda: tf.OlmoeConfig(**common, intermediate_size=16, num_experts=4),
              "mixtral": lambda: tf.MixtralConfig(**common, intermediate_size=16, num_local_experts=4)}[kind]()
    config.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- the jobs, as a user runs them
def run_job(tmp_path: Path, *args: str, module: str = "jobs.train") -> subprocess.CompletedProcess:
    """`python -m <module> args`, its Ray temp dir a fresh folder (empty afterwards: no Ray process started)."""
    ray_tmp = tmp_path / "ray_tmp"
    ray_tmp.mkdir(exist_ok=True)
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO), "ORCHESTRATOR_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert not any(ray_tmp.iterdir()), f"Ray started: {list(ray_tmp.iterdir())}"
    return proc


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one `config error:` line holding every needle; returns that line."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _inputs(tmp_path: Path, mixtral: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Each class of bad input: (the job's arguments, what its one line must name)."""
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in mixtral.iterdir():
        data = f.read_bytes()
        (trunc / f.name).write_bytes(data[: len(data) - 1000] if f.name == "model.safetensors" else data)
    size = (mixtral / "model.safetensors").stat().st_size
    sft = ["model.vocab_size=320", "data.task=sft", "data.train_tokenizer=300"]
    robot = _sft_file(tmp_path / "robot.jsonl", {"messages": [{"role": "robot", "content": "beep"},
                                                              {"role": "assistant", "content": "ok"}]})
    nomsg = _sft_file(tmp_path / "nomsg.jsonl", {"conversation": [{"role": "user", "content": "hi"}]})
    (tmp_path / "empty").mkdir()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  dim: 64\n  n_layers: 2: 3\ntrain:\n  steps: 3\n")
    return {
        "truncated safetensors": ([f"model.hf_path={trunc}"],
                                  [f"{trunc / 'model.safetensors'} is not a whole safetensors file: its header says "
                                   f"its tensors end at byte {size:,}, but the file has {size - 1000:,} bytes "
                                   f"(truncated)"]),
        "unknown chat role": ([*sft, f"data.path={robot}"], [f"{robot}, line 31", "'robot'", "unknown chat role"]),
        "record without messages": ([*sft, f"data.path={nomsg}"],
                                    [f"{nomsg}, line 31", "no `messages` (its keys: conversation)"]),
        "ids beyond the vocabulary in train.bin": (
            [f"data.path={_token_folder(tmp_path / 'bad_train', 'train.bin')}"],
            [f"{tmp_path / 'bad_train' / 'train.bin'} holds token id 300 at token 124", "model.vocab_size=256"]),
        "ids beyond the vocabulary in val.bin": (
            [f"data.path={_token_folder(tmp_path / 'bad_val', 'val.bin')}"],
            [f"{tmp_path / 'bad_val' / 'val.bin'} holds token id 300 at token 124"]),
        "empty data folder": ([f"data.path={tmp_path / 'empty'}"], [f"data.path='{tmp_path / 'empty'}' is a folder with no"]),
        "empty SFT data folder": ([*sft, f"data.path={tmp_path / 'empty'}"],
                                  [f"data.path='{tmp_path / 'empty'}' is a folder with no data files"]),
        "malformed YAML line": (["--config", str(bad_yaml)], [f"config file {bad_yaml} is not valid YAML: line 3"]),
    }


CASES = ("truncated safetensors", "unknown chat role", "record without messages", "ids beyond the vocabulary in "
         "train.bin", "ids beyond the vocabulary in val.bin", "empty data folder", "empty SFT data folder",
         "malformed YAML line")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_before_ray_and_the_run_directory(tmp_path, mixtral, case):
    args, needles = _inputs(tmp_path, mixtral)[case]
    run_dir = tmp_path / "run"
    proc = run_job(tmp_path, *args, f"run.dir={run_dir}")
    assert_refused(proc, *needles)
    assert not run_dir.exists()


@pytest.mark.parametrize("override,needles", [
    ("train.steps=[1", ["override 'train.steps=[1'", "not valid YAML", "did not find expected ',' or ']'"]),
    ("faults.plan=[{kind: kill", ["override 'faults.plan=[{kind: kill'", "not valid YAML", "flow mapping"]),
])
@pytest.mark.parametrize("module", ["jobs.train", "orchestrator"])
def test_a_malformed_override_is_one_line_exit_2_for_train_and_plan(tmp_path, override, needles, module):
    run_dir = tmp_path / "run"
    args = ["plan"] if module == "orchestrator" else []
    proc = run_job(tmp_path, *args, f"run.dir={run_dir}", override, module=module)
    assert_refused(proc, *needles)
    assert not run_dir.exists()


def test_debug_shows_the_traceback_of_bad_input(tmp_path):
    proc = run_job(tmp_path, "--debug", "train.steps=[1")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: override 'train.steps=[1'")


# --------------------------------------------------------------------------- item 6: defaults per model
@pytest.mark.parametrize("kind", ["qwen3_moe", "olmoe", "mixtral"])
def test_the_default_config_takes_a_transformers_model_resolving_its_balancing(tmp_path, caplog, kind):
    """The default job balances with DeepSeek-V3's bias and sequence-wise loss; with a model whose router has no
    correction bias the bias resolves to off, said once (the sequence-wise loss applies: it is computed from the
    model's router logits); set by the user the bias is refused."""
    path = _save_config(kind, tmp_path / kind)
    with caplog.at_level(logging.INFO, logger="orchestrator.config"):
        cfg = load_config(DEFAULT_CONFIG, [f"model.hf_path={path}"])
    assert (cfg.balance.seq_aux_loss_coeff, cfg.balance.bias_update_speed) == (0.0001, 0.0)
    notes = [r.getMessage() for r in caplog.records if "resolve to what does" in r.getMessage()]
    assert len(notes) == 1
    assert "seq_aux_loss_coeff" not in notes[0] and "balance.bias_update_speed=0.01 -> 0.0" in notes[0]

    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, [f"model.hf_path={path}", "balance.seq_aux_loss_coeff=0.0001",
                                     "balance.bias_update_speed=0.01"])
    message = str(e.value)
    assert "\n" not in message and "seq_aux_loss_coeff" not in message
    assert "balance.bias_update_speed=0.01 needs routers with a correction bias" in message


def test_keys_of_a_users_config_file_are_the_users_and_every_one_is_named(tmp_path):
    """A copy of the default config given with --config is the user's: each key that does not apply is named."""
    path = _save_config("mixtral", tmp_path / "mixtral")
    mine = tmp_path / "mine.yaml"
    mine.write_text(DEFAULT_CONFIG.read_text() + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(mine, [f"model.hf_path={path}", "model.expert_dim=64"])
    for key in ("model.expert_dim=64", "balance.bias_update_speed=0.01"):
        assert key in str(e.value)
    assert str(e.value).startswith("2 keys have no effect")


def test_a_default_that_applies_stays(tmp_path, caplog):
    """DeepSeek-V3's routers have the correction bias: the default's bias speed stays, and so does its sequence-wise
    loss (computed from the model's router logits)."""
    from tests.hf_tiny import tiny_hf_config

    tiny_hf_config("deepseek_v3").save_pretrained(tmp_path / "v3")
    with caplog.at_level(logging.INFO, logger="orchestrator.config"):
        cfg = load_config(DEFAULT_CONFIG, [f"model.hf_path={tmp_path / 'v3'}"])
    assert (cfg.balance.bias_update_speed, cfg.balance.seq_aux_loss_coeff) == (0.01, 0.0001)
    assert "bias_update_speed" not in caplog.text and "seq_aux_loss_coeff" not in caplog.text


def test_plan_with_a_transformers_model_on_the_default_config_says_the_resolution_once(tmp_path):
    path = _save_config("olmoe", tmp_path / "olmoe")
    proc = run_job(tmp_path, "plan", f"model.hf_path={path}", module="orchestrator")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("resolve to what does") == 1 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- config level
@pytest.mark.parametrize("text,needles", [
    ("model:\n  dim: 64\n  n_layers: [2\ntrain:\n  steps: 3\n",   # the bracket opened on line 3 is never closed
     ["line 4, column 6: did not find expected ',' or ']'", "flow sequence at line 3, column 13"]),
    ("model:\n\tdim: 64\n", ["line 2, column 1: found character that cannot start any token"]),
    ("model:\n  dim: 64\n  dim: 32\n", ["line 3, column 3: found duplicate key dim"]),
])
def test_yaml_errors_name_the_1_based_line(tmp_path, text, needles):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"config file {bad} is not valid YAML")
    for needle in needles:
        assert needle in str(e.value)


def test_keys_and_values_of_a_config_file_name_their_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: 64\ntrain:\n  lr: 0.1\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 5: bad value for 'train.steps'"):
        load_config(bad)
    bad.write_text("model:\n  dim: 64\ntrain:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz' \(line 4\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"bad value for 'faults.plan\[0\].kind': .*missing mandatory value"):
        load_config(None, ["faults.plan=[{step: 3}]"])   # a fault without its kind: no traceback either


def test_data_checks_name_the_record_of_json_arrays_parquet_and_the_pretraining_text(tmp_path):
    """Records of a JSON array and of Parquet are named by their 1-based record number; pretraining JSON lines
    need `text`; a broken JSON line is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.runtime.preflight import check_inputs

    sft = ["model.vocab_size=320", "data.task=sft", "data.train_tokenizer=300"]
    records = [_conversation(i) for i in range(5)]
    records[3] = {"messages": [{"role": "user", "content": 7}]}
    (tmp_path / "chat.json").write_text(json.dumps(records, indent=1))
    with pytest.raises(ConfigError, match=r"chat.json, record 4: message 1 of `messages` is \{\"role\": \"user\", "
                                          r"\"content\": 7\}, not \{role, content\} strings"):
        check_inputs(load_config(None, [*sft, f"data.path={tmp_path / 'chat.json'}"]))
    folder = tmp_path / "pq"
    folder.mkdir()
    rows = [_conversation(i) for i in range(6)]
    rows[4]["messages"][0]["role"] = "robot"
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-0.parquet")
    with pytest.raises(ConfigError, match=r"part-0.parquet, record 5: .* role 'robot'"):
        check_inputs(load_config(None, [*sft, f"data.path={folder}"]))
    text = _jsonl(tmp_path / "docs.jsonl", [{"text": "alpha"}, {"body": "beta"}])
    with pytest.raises(ConfigError, match=r"docs.jsonl, line 2: the record has no `text` \(its keys: body\)"):
        check_inputs(load_config(None, ["model.vocab_size=320", "data.train_tokenizer=300", f"data.path={text}"]))
    (tmp_path / "broken.jsonl").write_text(json.dumps(_conversation(0)) + "\n" + '{"messages": [\n')
    with pytest.raises(ConfigError, match=r"broken.jsonl, line 2: not valid JSON"):
        check_inputs(load_config(None, [*sft, f"data.path={tmp_path / 'broken.jsonl'}"]))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match=r"blank.jsonl has no records"):
        check_inputs(load_config(None, [*sft, f"data.path={tmp_path / 'blank.jsonl'}"]))
    (tmp_path / "notes.txt").write_text("alpha beta")
    with pytest.raises(ConfigError, match=r"notes.txt is text, but data.task=sft reads records with `messages`"):
        check_inputs(load_config(None, [*sft, f"data.path={tmp_path / 'notes.txt'}"]))


def test_a_tokenizer_folders_own_template_decides_the_roles(tmp_path):
    """With a tokenizer folder the roles are its chat template's: one that raises for `system` refuses the first
    record using it; one without a {% generation %} block is refused before the records are read."""
    from orchestrator.data.tokenizer import CHAT_TEMPLATE, train_tokenizer
    from orchestrator.runtime.preflight import check_inputs

    tok = train_tokenizer(["Say 1.", "1", "be brief"], 300, tmp_path / "tok")
    tok.chat_template = CHAT_TEMPLATE.replace("message['role'] == 'system' or ", "")
    tok.save_pretrained(tmp_path / "tok")
    records = [_conversation(i) for i in range(4)]
    records[2]["messages"].insert(0, {"role": "system", "content": "be brief"})
    data = _jsonl(tmp_path / "chat.jsonl", records)
    args = ["model.vocab_size=320", "data.task=sft", f"data.tokenizer={tmp_path / 'tok'}", f"data.path={data}"]
    with pytest.raises(ConfigError, match=rf"chat.jsonl, line 3: the chat template of the tokenizer in "
                                          rf"{tmp_path / 'tok'} refuses this conversation, the first with role "
                                          rf"'system' \(unknown chat role: system\); the data's roles it accepts: "
                                          rf"'user', 'assistant'"):
        check_inputs(load_config(None, args))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ConfigError, match=r"has no \{% generation %\} block"):
        check_inputs(load_config(None, args))


def test_sharded_checkpoints_are_checked_file_by_file(tmp_path, mixtral):
    """An index naming a missing shard, and a shard with bytes after its last tensor, are refused naming the file."""
    from safetensors.torch import load_file, save_file

    from orchestrator.model.hf_load import check_weight_files

    state = load_file(mixtral / "model.safetensors")
    keys = sorted(state)
    half = len(keys) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((mixtral / "config.json").read_text())
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, out / name, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    check_weight_files(out)
    with open(out / "model-00002-of-00002.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ConfigError, match=r"model-00002-of-00002.safetensors is not a whole safetensors file: .*"
                                          r"\(bytes after the last tensor\)"):
        check_weight_files(out)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model.safetensors.index.json: key .* is in 'model-00002-of-00002"):
        check_weight_files(out)


def test_the_drivers_own_checks_name_the_file_and_count_from_1(tmp_path):
    """After Ray (a safety net: the files changed since, or code that skips the jobs' pre-flight), the same
    errors still name the file and count records from 1."""
    from orchestrator.data.corpus import load_corpus
    from orchestrator.data.hf_data import _conversations
    from orchestrator.data.sft import tokenize_conversations
    from orchestrator.data.tokenizer import train_tokenizer

    nomsg = _sft_file(tmp_path / "nomsg.jsonl", {"conversation": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ConfigError, match=rf"{nomsg}, record 31: `messages` must be a list"):
        list(_conversations(nomsg))
    tok = train_tokenizer(["Say one.", "two"], 300, tmp_path / "tok")
    conversations = [_conversation(i)["messages"] for i in range(5)]
    conversations[2][0]["role"] = "robot"
    with pytest.raises(ConfigError, match=r"conversation 3 \(1-based.*unknown chat role: robot"):
        tokenize_conversations(conversations, tok)
    cfg = load_config(None, [f"data.path={_token_folder(tmp_path / 'bins', 'val.bin')}"])
    with pytest.raises(ConfigError, match=r"holds token id 300, .*token 124 of the validation split .*, id 300\)"):
        load_corpus(cfg.data).check_vocab(256, cfg.data.path)
