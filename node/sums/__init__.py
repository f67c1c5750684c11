"""A published sum on the node: fetch, decrypt, check, apply with the federation's optimizer, or
reject and report; roll back withdrawn rounds."""
