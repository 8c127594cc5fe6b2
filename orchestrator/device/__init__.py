"""A device: the Ray actor (actor.py, DeviceActor) that wraps one DeviceShard (shard.py: plain torch, its slice of
the model, its optimizer, its step), the group of them with standbys and the process group (group.py), the LR
schedule (schedule.py)."""
