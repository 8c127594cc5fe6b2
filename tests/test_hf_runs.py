"""Transformers models through the whole driver (Ray actors): a kill healed bit-identically in a DeepSeek-V4 run,
and the post-training path (a tokenizer trained here, SFT on packed conversations, export, generation) with the
project's balancing losses on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.driver import Driver
from tests.conftest import step_records, tiny_config
from tests.hf_tiny import make_tiny_hf, tiny_hf_config

STEPS = 6


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    return {f"{f.name}:{k}": v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in step_records(run_dir)]


REPLACE = ["balance.replace_every=2", "balance.replace_window=2", "balance.replace_min_gain=0"]


def test_kill_during_a_deepseek_v4_run_heals_identical_and_checkpoints_resume(ray_session, tmp_path):
    """Live expert re-placement moves the transformers model's experts (steps 2 and 4); a kill at step 5 heals to
    the fault-free run bit for bit; the step-3 checkpoint resumes exactly on 2 devices and, resharded, on 4."""
    model = tmp_path / "deepseek_v4"
    make_tiny_hf("deepseek_v4", model)

    def config(run_dir: Path, *overrides: str):
        return tiny_config(run_dir, f"model.hf_path={model}", f"train.steps={STEPS}", "cluster.num_devices=2",
                           "train.eval_batches=0", "balance.bias_update_speed=0.01", "checkpoint.every_steps=3",
                           *REPLACE, *overrides)

    twin, run = tmp_path / "twin", tmp_path / "run"
    Driver(config(twin), twin).run()
    records = step_records(twin)
    assert [r for r in records if r.get("replacement")], "no re-placement happened"
    summary = Driver(config(run, "faults.plan=[{step: 5, kind: kill, rank: 1}]"), run).run()
    assert summary.steps_done == STEPS and summary.recoveries == 1
    (incident,) = summary.incidents
    assert (incident["kind"], incident["rank"], incident["action"]) == ("dead", 1, "replaced")
    assert _losses(run) == _losses(twin)
    step3 = twin / "checkpoints" / "step_00000003"
    for world, exact in ((2, True), (4, False)):
        resumed = tmp_path / f"resumed{world}"
        Driver(config(resumed, f"train.resume={step3}", f"cluster.num_devices={world}"), resumed).run()
        got, want = [l for s, l in _losses(resumed) if s > 3], [l for s, l in _losses(twin) if s > 3]
        assert got == want if exact else got == pytest.approx(want, rel=1e-5), world
    healed, clean = _final_state(run), _final_state(twin)
    assert healed.keys() == clean.keys() and any(".experts." in k for k in clean)
    for key, value in clean.items():
        assert torch.equal(healed[key], value), key
    loads = [r["expert_load"] for r in step_records(run)]
    assert len(loads[0]) == 3 and all(sum(layer) == 8 * 32 * 2 for layer in loads[0])   # 3 MoE layers, top-2


def test_deepseek_v4_under_zero3_heals_and_resumes_bit_identical(ray_session, tmp_path):
    """DeepSeek-V4's indexer never gets a gradient (its scores only pick positions), so AdamW holds no state for it:
    under ZeRO-3 its snapshots and checkpoints say so (step count 0) instead of lacking moments that a restore
    then asked for. A non-finite step (rolled back to the snapshot) and a kill (a device rebuilt from the snapshots)
    heal to the fault-free bits; the step-3 checkpoint resumes exactly. (Every stage: test_optimizer_state.py.)"""
    model = tmp_path / "deepseek_v4"
    make_tiny_hf("deepseek_v4", model)

    def config(run_dir: Path, *overrides: str):
        return tiny_config(run_dir, f"model.hf_path={model}", f"train.steps={STEPS}", "cluster.num_devices=2",
                           "train.eval_batches=0", "balance.bias_update_speed=0.01", "checkpoint.every_steps=3",
                           "memory.zero_stage=3", *overrides)

    twin, run, resumed = tmp_path / "twin", tmp_path / "run", tmp_path / "resumed"
    Driver(config(twin), twin).run()
    manifest = json.loads((twin / "checkpoints" / "step_00000003" / "manifest.json").read_text())
    assert manifest["optimizer_steps"] and set(manifest["optimizer_steps"].values()) == {0}
    assert all(".indexer." in name for name in manifest["optimizer_steps"])
    summary = Driver(config(run, "faults.plan=[{step: 2, kind: nan, rank: 0}, {step: 5, kind: kill, rank: 1}]"),
                     run).run()
    assert [(i["kind"], i["action"], i["source"]) for i in summary.incidents] == [
        ("nan", "rolled back", "snapshot"), ("dead", "replaced", "snapshot")]
    assert _losses(run) == _losses(twin)
    healed, clean = _final_state(run), _final_state(twin)
    assert healed.keys() == clean.keys()
    for key, value in clean.items():
        assert torch.equal(healed[key], value), key
    Driver(config(resumed, f"train.resume={twin / 'checkpoints' / 'step_00000003'}"), resumed).run()
    assert [l for s, l in _losses(resumed) if s > 3] == [l for s, l in _losses(twin) if s > 3]
    assert _final_state(resumed).keys() == clean.keys()
    for key, value in clean.items():
        assert torch.equal(_final_state(resumed)[key], value), key


def test_sft_run_with_a_trained_tokenizer_exports_a_model_transformers_generates_with(ray_session, tmp_path):
    """data.train_tokenizer + data.task=sft on the standard-library instructions, two devices, as the embedded job
    (DeepSeek-V4, one sample per row); the loss counts assistant tokens only; the export holds the tokenizer and
    generates with transformers. The default config's balancing (DeepSeek-V3's bias and sequence-wise loss) on, the
    loss from the model's router logits over its learned layers (padding left out): reported, nonzero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.__main__ import main

    config = tiny_hf_config("deepseek_v4")
    config.vocab_size = 320
    config.save_pretrained(tmp_path / "cfg")
    run = tmp_path / "run"
    cfg = tiny_config(run, f"model.hf_config={tmp_path / 'cfg' / 'config.json'}", "data.task=sft",
                      "data.train_tokenizer=300", "data.max_samples=48", "data.seq_len=96",
                      f"train.steps={STEPS}", "cluster.num_devices=2", "train.eval_batches=1", "train.eval_every=3",
                      "train.global_batch_size=4", "balance.seq_aux_loss_coeff=0.0001", "balance.bias_update_speed=0.01")
    summary = Driver(cfg, run).run()
    assert summary.steps_done == STEPS and (run / "tokenizer" / "tokenizer.json").is_file()
    records = step_records(run)
    assert all(r["aux_loss"] > 0 for r in records)
    assert all(0 < r["tokens"] < 4 * 96 for r in records)      # trained (assistant) tokens only, not every slot
    assert main(["export", str(run), "--hf", str(tmp_path / "out")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a function."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
