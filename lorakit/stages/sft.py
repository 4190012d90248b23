"""Chat SFT: conversations in the model's chat template, the loss on the assistant turns (and their end-of-turn)."""

from .stage import Stage

STAGE = Stage("sft", "chat", "conversations, loss on assistant turns")
