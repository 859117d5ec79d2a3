"""A claypot backend: the gRPC server, its heap of live objects and its storage.

``python -m store.backend`` runs one. The modules inside are private and grouped
by layer: ``_service`` (the gRPC face) over ``_engine`` (the heap of live objects)
over ``_storage`` (log, checkpoints, segments) and ``_core`` (the pure state
machine and replication rules). See ARCHITECTURE.md.
"""
