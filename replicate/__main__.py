"""``python -m replicate`` and the ``replicate`` console script: the study command line (replicate.cli.py)."""
import sys

from replicate.cli import main

if __name__ == "__main__":
    sys.exit(main())
