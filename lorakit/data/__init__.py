"""Data: files -> records -> examples (token ids and labels) -> packed rows, prepared once into a cache."""
