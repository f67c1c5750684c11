"""``python -m cipherhive``: the same as the `cipherhive` command."""

import sys

from cipherhive.cli import main

# Guarded: spawned worker processes import this module as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())
