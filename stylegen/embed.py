"""``stylegen.embed``: the one-command path (ingest + build); the stages live in
:mod:`stylegen.ingest`, :mod:`stylegen.shards` and :mod:`stylegen.build`."""

from __future__ import annotations

from stylegen.ingest import (
    EmbedReport,
    build,
    default_batch_size,
    default_workers,
    embed,
    load_featurizer,
    read_batches,
    resolve_device,
    resolve_precision,
)

__all__ = ["EmbedReport", "build", "default_batch_size", "default_workers", "embed", "load_featurizer",
           "read_batches", "resolve_device", "resolve_precision"]
