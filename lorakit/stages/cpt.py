"""Continued pre-training: raw text, the loss on every token."""

from .stage import Stage

STAGE = Stage("cpt", "text", "raw text, loss on every token")
