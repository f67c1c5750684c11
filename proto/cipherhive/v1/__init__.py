"""Generated code for the cipherhive v1 wire contract (see federation.proto)."""
