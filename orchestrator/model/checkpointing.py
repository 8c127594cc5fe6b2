"""Activation checkpointing of the MoE transformer: none | selective | full, per block.

Modules keep their names and structure (checkpoints key on parameter names, so nothing is wrapped): each
Block, MoE and GroupedExperts has a `recompute` attribute its forward reads, and the forward runs the chosen
part through `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`.

  none       every op saves what its backward needs.
  selective  recomputed in backward: the attention sub-block (attn_norm + attention) and the MLP math (the
             dense SwiGLU, the shared expert, the routed experts' SwiGLU on the tokens already dispatched).
             Kept: the router's outputs, the dispatch (all_to_all) outputs, ffn_norm and the combine. Routing
             never runs twice and no collective is repeated.
  full       each block is recomputed from its input; the block's routing and all_to_all run again in
             backward (identically: routing is a function of the block input and the router's weights).

Non-reentrant checkpointing gives every tensor computed inside a region its gradient, side outputs included
(the balancing loss of an MoE layer). A recomputation would overwrite the side attributes an MoE layer sets
in its forward (`last_tokens_per_expert`, `aux_loss`, ...): `_Region` puts back what the forward left.

`set_observer` lets a memory meter (orchestrator/memory/measure.py) see what a recomputation saves: the checkpoint's
own saved-tensor hooks hide it from any outer hooks.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")

# What an MoE layer's forward leaves behind besides its output; a recomputation must not change it.
SIDE_ATTRS = ("last_tokens_per_expert", "last_dropped", "last_received", "aux_loss", "last_experts_NK")


class RecomputeObserver(Protocol):
    def recomputing(self, region: int) -> contextlib.AbstractContextManager: ...


_observer: RecomputeObserver | None = None


@contextlib.contextmanager
def set_observer(observer: RecomputeObserver | None) -> Iterator[None]:
    """While inside, every recomputation runs inside `observer.recomputing(region id)`."""
    global _observer
    previous, _observer = _observer, observer
    try:
        yield
    finally:
        _observer = previous


class _Region:
    """The function a checkpoint runs: its first call is the forward, later calls are recomputations."""

    _next_id = 0

    def __init__(self, fn: Callable[..., Any], keep: list[nn.Module]):
        self.fn, self.keep, self.calls = fn, keep, 0
        _Region._next_id += 1
        self.id = _Region._next_id

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            return self.fn(*args)
        kept = [(m, {a: getattr(m, a) for a in SIDE_ATTRS if hasattr(m, a)}) for m in self.keep]
        observed = _observer.recomputing(self.id) if _observer is not None else contextlib.nullcontext()
        try:
            with observed:
                return self.fn(*args)
        finally:  # also when checkpoint's early stop interrupts the recomputation
            for m, attrs in kept:
                for a, v in attrs.items():
                    setattr(m, a, v)


def checkpointed(fn: Callable[..., Any], *args: Any, keep: list[nn.Module] | None = None) -> Any:
    """fn(*args), its activations recomputed in backward (torch.utils.checkpoint, non-reentrant); the side
    attributes of the modules in `keep` stay as the forward set them."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(_Region(fn, keep or []), *args, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Set the checkpointing mode of every block of `model` (an MoETransformer, or a transformers model:
    model/hf.py, full or none only); `none` undoes it."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}")
    if getattr(model, "hf", None) is not None:
        _checkpoint_decoder_layers(model, mode)
        return
    for block, _ in model.blocks():   # (the MTP modules' blocks too)
        block.recompute = mode
        # an MoE layer (model/moe.py, which imports this module: asked by its switch, not by its class)
        if hasattr(block.ffn, "recompute"):
            block.ffn.recompute = mode == "selective"
            block.ffn.experts.recompute = mode == "selective"


def _checkpoint_decoder_layers(model: nn.Module, mode: str) -> None:
    """A transformers model: `full` recomputes each decoder layer from its hidden states (the layer's other
    arguments, masks and rotary tables, are closed over: none needs a gradient), through `checkpointed`, so the
    experts' side attributes stay and a memory meter sees the recomputation. The layer's `forward` becomes an
    instance attribute (names and structure unchanged); `none` removes it. Selective regions would have to be
    cut inside transformers' layer classes: refused by the config."""
    if mode == "selective":
        raise ValueError("selective activation checkpointing is the native block's; transformers models take full")
    for layer, experts in model.blocks():
        layer.__dict__.pop("forward", None)
        if mode == "full":
            layer.forward = _layer_forward(type(layer).forward.__get__(layer), [experts] if experts is not None else [])


def _layer_forward(forward: Callable[..., Any], keep: list[nn.Module]) -> Callable[..., Any]:
    def checkpointed_forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return checkpointed(lambda h: forward(h, *args, **kwargs), hidden_states, keep=keep)
    return checkpointed_forward
