"""dataClay's example data models (quickstart company, hello-family), as dataClay
documents them: they import ``dataclay``, which the shim path resolves to claypot."""
