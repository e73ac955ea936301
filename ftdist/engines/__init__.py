"""Engines as a room: how weights, gradients and optimizer states are laid out, stepped, saved
and loaded. base.py says what an engine is (the Engine protocol); registry.py names them and
resolves `distributed.engine` (torch-free: config validation asks it); plain.py and deepspeed.py
are the two there are (docs/engines.md)."""
