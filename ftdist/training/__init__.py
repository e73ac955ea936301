"""The one loop and what it runs on: context, checkpoints, batch plan, optimizer, regularizers, metrics."""
