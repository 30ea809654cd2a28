"""`python -m llmkit`: the command line, for launchers that run modules (torchrun -m llmkit)."""

import sys

from llmkit.cli import main

sys.exit(main())
