"""Tokens/s and MFU of the default job and of the larger GPU job, on the GPUs of this machine.

    python bench/gpu.py [--steps 200] [--devices N] [--only default|gpu] [key=value ...]

Runs `jobs.train` with `cluster.use_gpu=true` (one actor per GPU, nccl, bf16 autocast where supported):
the default config and jobs/configs/gpu.yaml, each on N devices (default: every GPU nvidia-smi lists).
Reads back tokens/s and MFU (mean over the steps after the first 10%), the GPU's name, the peak GPU memory
per device and the backend, and writes bench/results/gpu-<host>.json. Extra key=value overrides go to both
runs (e.g. `cluster.use_gpu=false` to try the script on CPU).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.jobrun import REPO, run_job  # noqa: E402


def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.startswith("GPU ")])


def measure(name: str, config: list[str], steps: int, devices: int, extra: list[str], tmp: Path) -> dict:
    run_dir = tmp / name
    summary, records, wall = run_job(run_dir, [*config, f"train.steps={steps}", f"cluster.num_devices={devices}",
                                               "cluster.use_gpu=true", "monitor.report=false", *extra])
    after = records[max(1, len(records) // 10):]
    status = json.loads((run_dir / "status.json").read_text())
    mfu = [r["mfu"] for r in after if r.get("mfu") is not None]
    return {"config": name, "devices": devices, "steps": summary["steps_done"], "wall_s": round(wall, 1),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in after) / len(after), 1),
            "mfu": round(sum(mfu) / len(mfu), 4) if mfu else None,
            "final_loss": summary["final_loss"], "val_loss": summary["val_loss"],
            "gpu": status["devices"][0].get("gpu"),
            "device_mem_mb": max(d.get("device_mem_mb") or 0 for d in status["devices"]),
            "step_time_s": round(sum(r["step_time_s"] for r in after) / len(after), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--devices", type=int, default=0, help="devices per run (default: the GPUs nvidia-smi lists)")
    ap.add_argument("--only", choices=["default", "gpu"], default=None)
    ap.add_argument("extra", nargs="*", help="key=value overrides for both runs")
    args = ap.parse_args()
    devices = args.devices or gpu_count()
    if devices < 1:
        raise SystemExit("no GPU found (nvidia-smi -L lists none); pass --devices N to run anyway")
    runs = {"default": ["--config", str(REPO / "jobs" / "configs" / "default.yaml")],
            "gpu": ["--config", str(REPO / "jobs" / "configs" / "gpu.yaml")]}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in runs.items():
            if args.only in (None, name):
                results.append(measure(name, config, args.steps, devices, args.extra, Path(tmp)))
                print(json.dumps(results[-1]))
    out = REPO / "bench" / "results" / f"gpu-{socket.gethostname()}.json"
    out.write_text(json.dumps({"steps": args.steps, "extra": args.extra, "runs": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
