"""A claypot backend: the gRPC server, its heap of live objects and its storage."""
