"""Data: sources -> records (no torch) -> rows (packing, pairs) -> the prepared cache; Ray Data shards."""
