"""`python -m gptlab` (and `torchrun -m gptlab`) run the command line."""

import sys

from .cli import main

sys.exit(main())
