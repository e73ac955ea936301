"""Memory: the estimate, the activation trace, `ftdist plan`."""
