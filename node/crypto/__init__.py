"""Encryption and decryption on every core: spawned worker processes, blocks in shared memory."""
