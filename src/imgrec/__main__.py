"""`python -m imgrec`: the command line, as torchrun starts it (`torchrun ... -m imgrec train`)."""

from .cli import script

script()
