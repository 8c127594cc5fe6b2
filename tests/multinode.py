"""Run `jobs.train` on a multi-node Ray cluster on this machine: a head without CPUs (the driver's node)
and N worker nodes of one CPU each, every one a raylet of its own (ray.cluster_utils.Cluster).

    python tests/multinode.py NODES [--cpus C] [--gpus G] [jobs.train arguments ...] [--and jobs.train arguments ...]

--cpus: CPUs of each worker node (default 1); --gpus: GPUs each worker node declares (logical: Ray schedules on
them, torch sees none). Jobs separated by --and run one after the other on the same cluster; their exit codes
are printed as a line `multinode exit codes: [..]`.

Node deaths are noticed within about a second (health checks every 200 ms) instead of Ray's default
tens of seconds. This process is the parent of every raylet, so it reaps them when they die: a killed
raylet left a zombie would look alive to its workers, which then never exit (on a real cluster the
raylet's parent reaps it). Exits with the highest exit code; the cluster is shut down in every case.
"""
from __future__ import annotations

import os
import sys
import threading

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # everything on 127.0.0.1

FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                   "health_check_timeout_ms": 200, "health_check_failure_threshold": 2}


def main(argv: list[str]) -> int:
    from ray.cluster_utils import Cluster

    nodes, args = int(argv[0]), argv[1:]
    per_node = {"num_cpus": 1}
    while args[:1] and args[0] in ("--cpus", "--gpus"):
        per_node["num_cpus" if args[0] == "--cpus" else "num_gpus"] = int(args[1])
        args = args[2:]
    jobs, job = [], []
    for a in args + ["--and"]:
        if a == "--and":
            jobs.append(job)
            job = []
        else:
            job.append(a)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "_system_config": FAST_NODE_DEATH})
    try:
        for _ in range(nodes):
            node = cluster.add_node(**per_node)
            for infos in node.all_processes.values():
                for info in infos:
                    threading.Thread(target=info.process.wait, daemon=True).start()  # reap it when it dies
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address
        from jobs.train import main as train

        codes = [train(job_args) for job_args in jobs]
        print(f"multinode exit codes: {codes}", flush=True)
        return max(codes)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
