"""The member node daemon and its training plug-in interface.

Data flow of a round through this package: ``trainer`` (the plug-in trains
the model on local data) → ``update`` (Δ = local - global, weighted and
flattened) → ``crypto_pool`` (encrypt, all cores) → ``upload`` (stream to the
server) … ``fetch`` (download the encrypted sum) → ``crypto_pool`` (decrypt)
→ ``update`` (divide by the summed weight, apply) → ``checkpoint``.
"""
