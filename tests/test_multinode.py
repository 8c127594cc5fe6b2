"""Placement across nodes, on a multi-node Ray cluster on this machine (tests/multinode.py: a head without CPUs
that runs the driver, three worker nodes of 2 CPUs and one logical GPU each, every node a raylet of its own).
One cluster, three jobs in a row:
- SPREAD puts the two devices on different nodes; the driver knows which node holds which device (status.json,
  the log) and has checked that the checkpoint directory is shared with the devices' nodes;
- PACK puts them on one node;
- cluster.use_gpu=true on nodes whose torch sees no GPU (the GPUs are logical) stops with a clear error instead of
  training on CPU."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "jobs" / "configs" / "tiny.yaml"


def test_spread_and_pack_placement_across_nodes(tmp_path):
    common = ["--config", str(TINY), "train.steps=3", "train.eval_batches=0", "cluster.cpus_per_device=1",
              "run.progress=lines", "monitor.report=false"]
    jobs = [[*common, f"run.dir={tmp_path / 'spread'}", "cluster.placement_strategy=SPREAD"],
            [*common, f"run.dir={tmp_path / 'pack'}", "cluster.placement_strategy=PACK"],
            [*common, f"run.dir={tmp_path / 'gpu'}", "cluster.use_gpu=true", "cluster.start_timeout_s=60"]]
    args = [a for job in jobs for a in ["--and", *job]][1:]
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "multinode.py"), "3", "--cpus", "2", "--gpus", "1",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "multinode exit codes: [0, 0, 1]" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]

    def nodes(run: str) -> list[str]:
        status = json.loads((tmp_path / run / "status.json").read_text())
        assert status["state"] == "finished" and status["step"] == 3
        return [d["node_id"] for d in sorted(status["devices"], key=lambda d: d["rank"])]

    spread, pack = nodes("spread"), nodes("pack")
    assert len(set(spread)) == 2, f"SPREAD put both devices on one node: {spread}"
    assert len(set(pack)) == 1, f"PACK split the devices over nodes: {pack}"
    # the driver logs where each device is, and checked the local checkpoint dir from the devices' nodes
    logged = re.findall(r"device (\d): node (\w+) \(127\.0\.0\.1\)", proc.stderr)
    assert logged[:2] == [("0", spread[0][:12]), ("1", spread[1][:12])]   # the first job's (SPREAD) lines
    assert f"checkpoint dir {tmp_path / 'spread' / 'checkpoints'}: written to from 2 device(s) on other nodes" \
        in proc.stderr
    # a GPU run on nodes whose torch has no CUDA: stopped at start, saying why and what to do
    assert re.search(r"cluster.use_gpu=true, but torch \S+ in device \d's process on 127.0.0.1 sees no CUDA GPU "
                     r"\(a CPU-only build: install a CUDA build of torch", proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "gpu" / "metrics.jsonl").exists() or not (tmp_path / "gpu" / "metrics.jsonl").read_text()
