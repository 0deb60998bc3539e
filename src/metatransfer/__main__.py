"""`python -m metatransfer ...` (also what torchrun launches) is the `mtl` command."""

from metatransfer.cli import main

if __name__ == "__main__":
    main()
