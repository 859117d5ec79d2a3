"""The backend's pure core: the object state machine and the replication rules.

No gRPC, Redis or file I/O here: functions take state and return instructions
that the engine carries out.
"""
