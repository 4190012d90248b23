"""lorakit: parameter-efficient fine-tuning of Qwen2 models, from raw text to a chat adapter."""

__version__ = "0.1.0"
