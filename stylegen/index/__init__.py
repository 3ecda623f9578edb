"""Features to a searchable index: append-only shards, frozen compression, the choice of FAISS
index, the build, the on-disk :class:`~stylegen.index.store.Index` and ingest (local or Ray Data)."""
