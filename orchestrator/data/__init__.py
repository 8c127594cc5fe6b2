"""Token corpora and the deterministic per-step global batch.

The names below load on first use (PEP 562): `import orchestrator.data.corpus` then costs no torch, so the
driver checks a run's data files before Ray and torch start (orchestrator/runtime/preflight.py)."""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"BatchStream": "batches", "device_slice": "batches", "global_offsets": "batches",
          "gather_sequences": "batches", "Corpus": "corpus", "load_corpus": "corpus", "stdlib_documents": "corpus"}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
