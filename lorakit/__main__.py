"""`python -m lorakit ...` (also what `torchrun -m lorakit train ...` runs)."""

from .cli import main

main()
