"""The stochastic policy (layer 2): which modules are random, switching them on and restoring, editing rates."""
