"""Inference: generation, sessions of named adapters on one base, the server, evaluation."""
