"""Run `jobs.train` on a multi-node Ray cluster on this machine: a head without CPUs (the driver's node)
and N worker nodes of one CPU each, every one a raylet of its own (ray.cluster_utils.Cluster).

    python tests/multinode.py NODES [jobs.train arguments ...]

Node deaths are noticed within about a second (health checks every 200 ms) instead of Ray's default
tens of seconds. This process is the parent of every raylet, so it reaps them when they die: a killed
raylet left a zombie would look alive to its workers, which then never exit (on a real cluster the
raylet's parent reaps it). Exits with the job's exit code; the cluster is shut down in every case.
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

    nodes, job_args = int(argv[0]), argv[1:]
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "_system_config": FAST_NODE_DEATH})
    try:
        for _ in range(nodes):
            node = cluster.add_node(num_cpus=1)
            for infos in node.all_processes.values():
                for info in infos:
                    threading.Thread(target=info.process.wait, daemon=True).start()  # reap it when it dies
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address
        from jobs.train import main as train

        return train(job_args)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
