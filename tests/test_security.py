"""Secrets and untrusted names: credentials in URLs never reach a run directory, a report, MLflow or a log; a
checkpoint manifest cannot name a file outside its checkpoint; the rendezvous port is bound, not probed."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import socket
import sys
import types
from pathlib import Path

import pytest

from orchestrator.checkpoint.shard import (DENSE_FILE, CheckpointError, check_file_name, expert_file, load_verified,
                                           restore_from_files)
from orchestrator.config import ConfigError, load_config, redact_text, redact_url, redacted, redacted_yaml
from orchestrator.checkpoint.storage import Storage, StorageError

WEBHOOK = "https://hooks.slack.com/services/T000/B000/SLACKSECRET"
S3 = "s3://AKIAKEY:S3SECRET@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http&session_token=TOKENSECRET"
SECRETS = ("SLACKSECRET", "AKIAKEY", "S3SECRET", "TOKENSECRET", "USERPASS")


def assert_no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} in {text[:2000]}"


@pytest.mark.parametrize("url,shown", [
    ("s3://KEY:SECRET@bucket/x", "s3://***@bucket/x"),
    ("s3://AKIA:ab/c+d@bucket/x", "s3://***@bucket/x"),             # an unencoded '/' in the secret
    ("https://user:pass@host/a?token=abc&region=eu&flag#frag", "https://***@host/a?token=***&region=eu&flag"),
    ("s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http&secret_key=S&access_key=A",
     "s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http&secret_key=***&access_key=***"),
    ("https://x.blob.core.windows.net/c?sv=2022&sig=abc", "https://x.blob.core.windows.net/c?sv=2022&sig=***"),
    ("gs://bucket/prefix", "gs://bucket/prefix"),                    # nothing secret: unchanged
    ("/data/corpus.txt", "/data/corpus.txt"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_a_webhook_url_keeps_only_its_host():
    assert redact_url(WEBHOOK, keep_path=False) == "https://hooks.slack.com/***"
    assert redact_url("http://127.0.0.1:9000", keep_path=False) == "http://127.0.0.1:9000"


def secret_config():
    return load_config(None, [f"monitor.webhook_url={WEBHOOK}", f"checkpoint.dir={S3}",
                              "train.resume=https://me:USERPASS@files.example/ckpt"])


def test_redacted_config_holds_no_secret_and_keeps_the_rest():
    cfg = secret_config()
    out = redacted(cfg)
    assert_no_secret(json.dumps(out))
    assert_no_secret(redacted_yaml(cfg))
    assert out["monitor"]["webhook_url"] == "https://hooks.slack.com/***"
    assert out["checkpoint"]["dir"] == ("s3://***@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
                                        "&session_token=***")
    assert out["model"] == redacted(load_config(None, []))["model"]
    assert cfg.monitor.webhook_url == WEBHOOK   # the config itself is untouched: the run still posts there


def test_run_directory_config_and_report_hold_no_secret(tmp_path):
    from orchestrator.monitoring.status import make_run_dir
    from orchestrator.monitoring.report import write_report

    cfg = secret_config()
    cfg.run.dir = str(tmp_path / "run")
    run = make_run_dir(cfg)
    assert "webhook_url: https://hooks.slack.com/***" in (run / "config.yaml").read_text()
    assert_no_secret((run / "config.yaml").read_text())
    # a run directory written before config.yaml was redacted: the report redacts it itself
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text(f"monitor:\n  webhook_url: {WEBHOOK}\ncheckpoint:\n  dir: {S3}\n")
    (old / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "grad_norm": 1.0, "lr": 1e-3,
                                                   "tokens_per_s": 100.0, "step_time_s": 0.1, "time": 1.0}) + "\n")
    (old / "incidents.jsonl").write_text(json.dumps({"step": 1, "kind": "checkpoint", "rank": 0, "action": "retried",
                                                     "detail": f"could not write x under {S3}"}) + "\n")
    page = write_report(old).read_text()
    assert "hooks.slack.com/***" in page and "s3://***@bucket/runs" in page
    assert_no_secret(page)


def test_mlflow_params_hold_no_secret(monkeypatch):
    from orchestrator.monitoring.metrics import MLflowSink

    logged = {}
    fake = types.SimpleNamespace(start_run=lambda run_name: None, log_params=logged.update)
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    MLflowSink(secret_config(), "run")
    assert logged["monitor.webhook_url"] == "https://hooks.slack.com/***" and "train.steps" in logged
    assert_no_secret(json.dumps(logged))


def test_webhook_failures_are_logged_without_the_url(caplog):
    from orchestrator.monitoring.alerts import Alert, Webhook

    outcomes = []
    hook = Webhook("http://127.0.0.1:9/services/T000/B000/SLACKSECRET", timeout_s=1, retries=0,
                   on_result=lambda alert, outcome: outcomes.append(outcome))
    with caplog.at_level(logging.WARNING, logger="orchestrator.monitoring.alerts"):
        hook.send(Alert(step=1, rule="maxvio", value=2.0, threshold=1.0, action="notify", detail="x"))
        hook.wait(10)
    assert outcomes and outcomes[0].startswith("failed:")
    assert "alert webhook http://127.0.0.1:9/*** failed after 1 tries" in caplog.text
    assert_no_secret(caplog.text + outcomes[0])


def test_config_errors_do_not_echo_a_webhook_url():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["monitor.webhook_url=ftp://hooks.example/T000/SLACKSECRET"])
    assert "monitor.webhook_url='ftp://hooks.example/***' must be an http:// or https:// URL" in str(e.value)


def test_storage_shows_its_uri_redacted():
    s3 = Storage("s3://AKIAKEY:S3SECRET@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http")
    assert_no_secret(repr(s3) + s3.shown)
    with pytest.raises(StorageError) as e:
        s3.child("../other")
    assert "refusing the path '../other' under s3://***@bucket/runs" in str(e.value)
    assert_no_secret(str(e.value))
    assert_no_secret(redact_text(f"could not write x under {S3}: boom"))


# --------------------------------------------------------------------------- names from a manifest
OUTSIDE = ["../../secret.txt", "/etc/passwd", "sub/../../secret.txt", "..\\secret.txt", "a//b", "./a", "C:/x",
           "experts-00000.safetensors/../../../secret.txt"]


@pytest.mark.parametrize("name", OUTSIDE)
def test_storage_refuses_paths_outside_its_root(tmp_path, name):
    root = Storage(str(tmp_path / "root"))
    (tmp_path / "secret.txt").write_text("outside")
    for call in (lambda: root.read(name), lambda: root.write(name, b"x"), lambda: root.write_atomic(name, b"x"),
                 lambda: root.exists(name), lambda: root.size(name), lambda: root.child(name),
                 lambda: root.delete(name)):
        with pytest.raises(StorageError) as e:
            call()
        assert f"refusing the path {name!r} under {tmp_path / 'root'}" in str(e.value)
    assert (tmp_path / "secret.txt").read_text() == "outside"
    root.write("a/b.txt", b"x")   # a path inside is fine
    assert root.read("a/b.txt") == b"x" and root.child("a").read("b.txt") == b"x"


def crafted_checkpoint(tmp_path: Path, name: str) -> tuple[Path, dict]:
    """A checkpoint folder whose manifest names `name`, with a file there (outside the folder) whose size and
    checksum match: only the name check stands between a load and that file."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    secret = b"root:x:0:0:root:/root:/bin/bash\n"
    target = (ckpt / name) if not name.startswith("/") else tmp_path / "abs"
    if not name.startswith("/"):
        target.resolve().parent.mkdir(parents=True, exist_ok=True)
        target.resolve().write_bytes(secret)
    meta = {"size": len(secret), "sha256": hashlib.sha256(secret).hexdigest()}
    manifest = {"step": 1, "world_size": 1, "files": {name: meta}, "expert_files": {"layers.1.moe": {"0": name}},
                "optimizer_step": 1, "config_hash": "x", "fingerprint": {}, "seed": 0, "format": 1}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ckpt, manifest


@pytest.mark.parametrize("name", ["../../secret.txt", "/etc/passwd", "../step_00000002/dense.safetensors"])
def test_a_crafted_manifest_name_fails_the_load_before_anything_is_read(tmp_path, name):
    ckpt, manifest = crafted_checkpoint(tmp_path, name)
    read = []

    def recording_read(rel: str) -> bytes:
        read.append(rel)
        return Storage(str(ckpt)).read(rel)

    with pytest.raises(CheckpointError) as e:
        restore_from_files(None, None, 0, manifest, recording_read, str(ckpt))
    assert f"the manifest names the file {name!r}, which is not a plain file name inside the checkpoint" in str(e.value)
    assert read == []   # refused before any read
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_verified(recording_read, name, manifest["files"][name], str(ckpt))
    assert read == []
    # the tools (list, export) read through verify + load_verified: refused too, nothing exported
    from orchestrator.checkpoint.tools import read_parameters

    with pytest.raises(CheckpointError) as e:
        read_parameters(Storage(str(ckpt)))
    assert name in str(e.value)


def test_the_names_checkpoints_are_written_with_pass():
    for name in (DENSE_FILE, expert_file(0), expert_file(12345)):
        assert check_file_name(name, "ckpt") == name
    for name in OUTSIDE + [".hidden", "a/b", "..", "", None, 3, "x" * 300]:
        with pytest.raises(CheckpointError, match="s3://\\*\\*\\*@b/c: the manifest names the file"):
            check_file_name(name, "s3://K:S@b/c")


# --------------------------------------------------------------------------- the rendezvous port
def test_the_rendezvous_port_is_held_from_the_moment_it_is_chosen(monkeypatch):
    """open_rendezvous binds and listens at once; join on rank 0 serves the store on that same socket."""
    import torch.distributed as dist

    from orchestrator.parallel import groups

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    port = groups.open_rendezvous("127.0.0.1")
    with socket.socket() as other, pytest.raises(OSError) as e:   # nobody else can take it meanwhile
        other.bind(("127.0.0.1", port))
    assert e.value.errno == errno.EADDRINUSE
    first = groups._rendezvous
    again = groups.open_rendezvous("127.0.0.1")   # a group formed again: the earlier socket is closed
    assert first.fileno() == -1
    try:
        groups.join("gloo", "127.0.0.1", again, 0, 1, timeout_s=30)
        assert groups._rendezvous is None and dist.get_world_size() == 1   # the held socket went to the store
        with socket.create_connection(("127.0.0.1", again), timeout=5):   # and the store serves on it
            pass
    finally:
        groups.leave()
        groups.close_rendezvous()
