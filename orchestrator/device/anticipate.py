"""Anticipatory routing (DeepSeek-V4 technical report, sec. 4.2.3 "Mitigating Training Instability") on one device.

The report: "at step t, we use the current network parameters theta_t for feature computation, but the routing
indices are computed and applied using the historical network parameters theta_{t-Delta t}"; "we fetch the data for
step t in advance at step t-Delta t. We 'anticipatorily' compute and cache the routing indices to be used later at
step t" (one extra forward pass over the data). Delta t is not published: here it is `balance.anticipatory_delay`
(default 1, our choice).

Here, at step s before its update (the parameters theta_s, router bias included), one no-grad forward of step
s+delay's batch (this device's slice, micro-batch by micro-batch, as the step itself will run it) records every MoE
layer's chosen logical expert ids; at step s+delay they are the routing replay of the native MoE layers (model/moe.py
`replay_NK`: the ids are taken as chosen, the gates are the live router's scores at them, so the router still
learns), set before each micro-batch's forward and cleared after its backward. Logical ids: an expert re-placement
between the two steps changes nothing.

When the mode is on (every step with balance.anticipatory_routing; inside the windows [first, last] that an alert
with action=anticipate opened, driver/anticipate.py, which sends them with every step): a step uses the ids cached for
it if there are any (the first `delay` steps of a stretch have none, as steps 1..delay of a run: normal routing), and
caches the ids of step s+delay while the mode is on then too.

The cache decides the routing of the next `delay` steps, so it is part of the device's state: snapshots and
checkpoints carry it in the device's own file (`extra/anticipate/...`, checkpoint/shard.py) with the windows and the
world size it was computed for (another number of devices slices the batch otherwise: those ids are dropped, with a
warning, and those steps route normally).

Shape legend: B this device's sequences of the step, T sequence length, K experts per token.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

PREFIX = "anticipate/"
Windows = list[tuple[int, int]]   # [first step, last step] of each stretch of anticipatory routing an alert opened


def anticipating(step: int, windows: Windows, always: bool) -> bool:
    """Is anticipatory routing on at `step`: always, or inside one of the windows (both ends included)?"""
    return always or any(first <= step <= last for first, last in windows)


class Anticipator:
    """One device's anticipatory routing: the mode's windows, the cached ids of the next `delay` steps."""

    def __init__(self, delay: int, always: bool, world: int, last_step: int):
        self.delay, self.always, self.world, self.last_step = delay, always, world, last_step
        self.windows: Windows = []
        self.ids: dict[int, list[torch.Tensor]] = {}   # step -> per MoE layer (moe_layers() order) ids_BTK int64
        self.used = False                              # the step in progress replays cached ids

    def on(self, step: int) -> bool:
        return anticipating(step, self.windows, self.always)

    def begin(self, step: int, guard: dict[str, Any] | None) -> None:
        """A step begins: the windows the driver sent (`guard["anticipate"]`); cached ids of earlier steps, or of
        a step at which the mode is off, are dropped."""
        if guard is not None and "anticipate" in guard:
            self.windows = [(int(a), int(b)) for a, b in guard["anticipate"]]
        self.ids = {s: ids for s, ids in self.ids.items() if s >= step and self.on(s)}
        self.used = False

    @torch.no_grad()
    def route_ahead(self, shard: Any, step: int) -> None:
        """Before step `step`'s update: the ids the current parameters choose for step step+delay's batch, cached
        for it (when the mode is on now and then, and that step is in the run)."""
        from orchestrator.parallel.sharding import reshard

        ahead = step + self.delay
        if not (self.on(step) and self.on(ahead)) or ahead > self.last_step:
            return
        inputs_BT, targets_BT, _, _ = shard._batch(ahead)
        micro = shard.cfg.train.micro_batches
        model = shard.model
        model.eval()   # no balancing losses: only the routing is wanted
        parts: list[list[torch.Tensor]] = []
        try:
            for x_BT, y_BT in zip(inputs_BT.chunk(micro), targets_BT.chunk(micro)):
                if shard.cfg.model.mtp_depth:   # the MTP modules' MoE layers route too (their rows are T - k long)
                    shard._mtp_loss_sums(x_BT, y_BT)
                else:
                    shard._loss_sum(x_BT, y_BT)
                parts.append([ids_NK.view(x_BT.shape[0], -1, ids_NK.shape[-1]) for ids_NK in model.routing()])
        finally:
            model.train()
            reshard(model)   # ZeRO 2 keeps the unsharded parameters after a forward without backward
        self.ids[ahead] = [torch.cat(layer) for layer in zip(*parts)]

    def replays(self, step: int, micro: int) -> list[list[torch.Tensor]] | None:
        """The cached ids of `step`, one list (per MoE layer) per micro-batch; None: route normally."""
        ids = self.ids.pop(step, None) if self.on(step) else None
        self.used = ids is not None
        if ids is None:
            return None
        return [list(layers) for layers in zip(*(layer.chunk(micro) for layer in ids))]

    def reported(self, step: int) -> dict[str, bool]:
        """The step record's fields: the mode was on, and the step's routing came from the parameters of step
        step-delay (cached ids replayed)."""
        return {"anticipatory": self.on(step), "anticipated": self.used}

    # ------------------------------------------------------------- state
    def state(self) -> dict[str, torch.Tensor]:
        """What snapshots and checkpoints keep of it (this device's own file, under `extra/`)."""
        out = {f"{PREFIX}world": torch.tensor([self.world]),
               f"{PREFIX}windows": torch.tensor(self.windows, dtype=torch.int64).view(-1, 2)}
        for step, layers in self.ids.items():
            for j, ids in enumerate(layers):
                out[f"{PREFIX}ids/{step}/{j}"] = ids
        return out

    def take(self, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put back what `state` saved (nothing saved: no cache, no windows); the other extras are returned."""
        mine = {k[len(PREFIX):]: v for k, v in extras.items() if k.startswith(PREFIX)}
        self.windows = [(int(a), int(b)) for a, b in mine["windows"].tolist()] if "windows" in mine else []
        ids: dict[int, dict[int, torch.Tensor]] = {}
        for key, t in mine.items():
            if key.startswith("ids/"):
                step, layer = key[len("ids/"):].split("/")
                ids.setdefault(int(step), {})[int(layer)] = t.long()
        saved_world = int(mine["world"][0]) if "world" in mine else self.world
        if ids and saved_world != self.world:
            log.warning("anticipatory routing: the routing ids cached for steps %s were computed on %d devices' "
                        "slices, not %d; those steps route normally", sorted(ids), saved_world, self.world)
            ids = {}
        self.ids = {s: [layers[j] for j in sorted(layers)] for s, layers in ids.items()}
        self.used = False
        return {k: v for k, v in extras.items() if not k.startswith(PREFIX)}


@contextlib.contextmanager
def replaying(model: Any, replays: list[list[torch.Tensor]] | None, device: torch.device) -> Iterator[Any]:
    """Inside: `use(i)` sets micro-batch i's replay (before its forward; it stays through its backward); cleared on
    the way out, also after an error. `replays` None: `use` does nothing."""
    def use(i: int) -> None:
        if replays is not None:
            model.set_routing_replay([ids.to(device) for ids in replays[i]])
    try:
        yield use
    finally:
        if replays is not None:
            model.set_routing_replay(None)
