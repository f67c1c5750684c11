"""The node's half of a masked round (SecAgg, Bonawitz et al., CCS 2017, §4 and §6): the steps of
one participation, the driver that follows the round's events, the checks before decrypting a
masked sum, and the ledger that releases a self-mask at most once per base model."""
