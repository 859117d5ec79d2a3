"""The backend's service: the thin gRPC servicer, stream guards, the cross-language
RPCs, and the Dask worker a backend can host."""
