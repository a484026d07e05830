"""Stage 1 of DoE (§3.2, App. A.2): LDA topic labels for every token of a pre-training corpus.

``TokenCorpus`` holds token-id shards on disk (memory-mapped); ``LDA`` fits the topic model with
the C++ engine ``doe_ext._lda`` and writes per-token topic ids and per-document theta beside the
corpus. ``doe_ext.lda.distributed`` runs the labelling on Ray. NumPy only: no torch here.
"""
from doe_ext.lda.corpus import CorpusError, CorpusWriter, TokenCorpus
from doe_ext.lda.model import LDA

__all__ = ["LDA", "CorpusError", "CorpusWriter", "TokenCorpus"]
