"""`python -m tuner.cli`: the same entry point as the `fmtune` console script."""

from __future__ import annotations

from tuner.cli import main

if __name__ == "__main__":
    main()
