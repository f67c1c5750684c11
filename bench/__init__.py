"""`cipherhive bench`: real rounds on loopback, the product next to its baselines.

Nothing here is a product mode: the plaintext and per-layer TenSEAL codecs
exist only so the benchmark can run them through the same server, node and
transport code as the product, in the same run.
"""
