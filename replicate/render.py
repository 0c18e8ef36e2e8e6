"""``python -m replicate.render``: the tables' renderer (replicate/report/render.py)."""
import sys

from replicate.report.render import main

if __name__ == "__main__":
    sys.exit(main())
