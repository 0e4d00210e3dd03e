"""`python -m strato.consolidate ckpt/ out/`: the command line of `strato.consolidate`
(runtime/consolidation.py), kept apart so the package never imports this module first."""

from __future__ import annotations

import sys

from .runtime.consolidation import main

if __name__ == "__main__":
    sys.exit(main())
