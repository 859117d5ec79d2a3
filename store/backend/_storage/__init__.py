"""The backend's storage: the redo log with group commit, checkpoints, recovery,
O_DIRECT writes, and the shared-memory segments and change words of zero-copy."""
