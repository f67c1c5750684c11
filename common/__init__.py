"""cipherhive: secure aggregation for federated learning.

Members train locally, encrypt their update with CKKS (TenSEAL/SEAL), and an
aggregator that holds no secret key adds the ciphertexts; members decrypt
only the sum. This package holds what both daemons share: the wire codec,
keys, configuration, logging and the command line.
"""

__version__ = "0.1.0"
