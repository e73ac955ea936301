"""Where bytes go and come from: object storage, the hub, run-directory names, locks, safe reads and writes."""
