"""RL post-training's driver-side service: rollout workers (colocated or a separate pool), weight sync, each step's
batch (service.py), the rollout pool (rollout.py). The pure parts live below: the loss in model/policy_loss.py, the
sampler and routing replay in model/generate.py and model/moe.py, tasks and rewards in data/, the device's RL step
in device/rl.py and its rollout engine in device/rollout.py."""
