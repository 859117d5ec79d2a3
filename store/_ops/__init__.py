"""Cluster operations: the embedded Redis and backend processes (``LocalCluster``),
the ``claypot`` command line, the demo, and the child-process lifeline."""
