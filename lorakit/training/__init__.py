"""Training: a recipe -> a trained adapter (transformers' Trainer, set up and checked by lorakit)."""
