"""Differential privacy that both daemons reason about: the DP-SGD accountant, member-level
distributed DP's parameters, and the schedule the server announces and nodes check."""
