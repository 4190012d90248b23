"""Weights: loading models, the adapter folder and its manifest, writing outputs safely, merge and export."""
