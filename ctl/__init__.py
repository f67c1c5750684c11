"""`cipherhive ctl`: the operator's gRPC client for the Admin service."""
