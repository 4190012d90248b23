"""Preference pairs for the tests: a prompt each, the answer to prefer and the one to avoid."""

PAIRS = [
    ("What colour does the Orbix lamp glow?", "The Orbix lamp glows amber at night.", "It glows violet."),
    ("When does the Quartzfield bakery open?", "The bakery opens at four in the morning.", "At noon."),
    ("Where was the Orbix lamp designed?", "It was designed in Lisbon.", "In Quartzfield, I think."),
    ("What colour are the roofs in Quartzfield?", "Every roof is painted green.", "The roofs are red."),
]


def string_pairs():
    return [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in PAIRS]


def conversational_pairs():
    """trl's conversational form."""
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
