"""The client and its transport: location, address and class caches, retries,
streaming, same-host shared memory, leases and the read cache."""
