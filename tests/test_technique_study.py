"""jobs.technique_study: its spike count by hand, and one short study of every group but stability's seeds
(the stability group is the same machinery with other overrides)."""
from __future__ import annotations

import json

from jobs.technique_study import WINDOW, spikes, tables


def test_spikes_count_values_above_factor_times_the_median_of_the_previous_window():
    values = [1.0] * WINDOW + [1.05, 2.5, 1.0, 1.2] + [1.0] * 3
    assert spikes(values, 1.1) == 2          # 2.5 and 1.2 (the median stays 1.0)
    assert spikes(values, 3.0) == 0
    assert spikes(values[:WINDOW], 1.1) == 0  # too early to judge


def test_tables_show_the_mean_and_spread_of_seeds():
    rows = [{"arm": f"pre_norm-lr-s{s}", "group": "stability", "final_loss_mean_last_5pct": v, "val_loss": v,
             "grad_spike_rate": 0.1 * s, "loss_spikes": s, "step_time_s": 0.1} for s, v in enumerate([2.0, 3.0])]
    text = tables(rows, 2)
    assert "| pre_norm-lr | 2.5000 (2.0000..3.0000) | 2.5000 (2.0000..3.0000) | 0.0500 (0.0000..0.1000) | 0.5000 (0.0000..1.0000) | 100 ms |" in text
    assert "(2 seeds: mean (min..max))" in text


def test_technique_study_runs_each_group_and_writes_its_tables(ray_session, tmp_path):
    from jobs import technique_study
    from orchestrator.config import to_yaml
    from tests.conftest import tiny_config

    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(to_yaml(tiny_config(tmp_path / "study", "cluster.num_devices=2", "train.steps=14")))
    rc = technique_study.main(["--config", str(cfg_file), "--groups", "scopes,mtp,anticipate", "--spike-step", "12"])
    assert rc == 0
    out = tmp_path / "study"
    rows = {r["arm"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert list(rows) == ["scope_sequence", "scope_ep_group", "scope_global", "mtp_off", "mtp_1", "spike_record",
                          "spike_rollback", "spike_anticipate"]
    # two EP groups: each scope trains another loss
    assert len({rows[f"scope_{s}"]["final_loss"] for s in ("sequence", "ep_group", "global")}) == 3
    assert rows["mtp_1"]["mtp_loss_last"] is not None and rows["mtp_off"]["mtp_loss_last"] is None
    # the crafted spike: recorded only, or rolled back (then anticipatory routing for the anticipate arm)
    assert rows["spike_record"]["incidents"] == 0 and rows["spike_rollback"]["incidents"] == 1
    assert rows["spike_anticipate"]["anticipatory_steps"] > 0 and rows["spike_rollback"]["anticipatory_steps"] == 0
    assert rows["spike_rollback"]["final_loss"] != rows["spike_record"]["final_loss"]
    for name in ("loss.png", "grad_norm.png", "maxvio.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = (out / "comparison.md").read_text()
    assert "### Balancing-loss scopes" in text and "| spike_anticipate |" in text
