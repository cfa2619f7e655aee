"""Composition-time pieces: where the configs live, the allow-listed `instantiate`, checks."""
