"""Expert-parallel MoE training on Ray device actors.

The composition root: config (the bottom layer) validates a transformers model from facts only the model layer
can give (its config.json and a meta-device build). Config cannot import the model layer, so the binding is
made here, where both are known; the model layer is imported when a config names a transformers model, not
before (importing orchestrator.config imports no torch)."""
from orchestrator.config.model import describe_hf_models_with as _bind


def _hf_summary(m):  # type: ignore[no-untyped-def]
    from orchestrator.model.hf import hf_summary

    return hf_summary(m)


_bind(_hf_summary)
