"""Starting runs: local mode, the Ray driver, the Ray head, preflight checks, run directories."""
