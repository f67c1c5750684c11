"""CKKS through SEAL (TenSEAL's bindings): the federation's key, the update codec, SEAL's own
serialization format, and a masked round's sum as c0 alone (docs: design decisions, encoding)."""
