"""`python -m imgrec`: the command line, as torchrun starts it (`torchrun ... -m imgrec train`)."""

import sys

from .cli import main

sys.exit(main())
