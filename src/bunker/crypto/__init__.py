"""Crypto layer: primitives (aead, kem, sign, derive) and recipes (key files, shares)."""
