"""Memory: the estimate per device and the activation trace it counts."""
