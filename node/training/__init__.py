"""Local training for a round: run the plug-in on the global model, evaluate it, weigh the
update and turn it into the vector that gets encrypted (and back again after decryption)."""
