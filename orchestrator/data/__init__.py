"""Token corpora and the deterministic per-step global batch."""
from orchestrator.data.batches import BatchStream, device_slice, global_offsets, gather_sequences
from orchestrator.data.corpus import Corpus, load_corpus, stdlib_documents

__all__ = ["BatchStream", "device_slice", "global_offsets", "gather_sequences", "Corpus", "load_corpus",
           "stdlib_documents"]
