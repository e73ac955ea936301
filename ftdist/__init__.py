"""ftdist: fine-tune causal language models, locally or on Ray clusters."""

__version__ = "0.1.0"
