"""`python -m metatransfer ...` (also what torchrun launches) is the `mtl` command."""

import sys

from metatransfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
