"""``python -m replicate.docs``: regenerates the generated documentation (replicate/report/docs.py)."""
import sys

from replicate.report.docs import main

if __name__ == "__main__":
    sys.exit(main())
