"""Starting runs: local mode, the Ray driver, the Ray head, preflight checks, `ftdist plan` and `ftdist prepare`, run directories."""
