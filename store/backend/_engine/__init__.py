"""The backend's engine: the heap of live objects that carries out the core's
instructions (log, checkpoint, load, spill, move, delete), call cancellation,
and replica shipping."""
