"""Differential privacy on the member's machine: the fail-closed privacy ledger, cryptographic
randomness, record-level DP-SGD's schedule checks and member-level discrete Gaussian noise."""
