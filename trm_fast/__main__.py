"""`python -m trm_fast <command>`: the same command line as `trm-fast` (see trm_fast.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
