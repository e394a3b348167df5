"""`python -m kdfast.benchmark [args...]`: the KD-loss comparison table (see `kdfast.benchmark.cli.main`).

Exits with `main`'s status: 0 on success, 2 on bad options.
"""

import sys

from kdfast.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m kdfast.benchmark"))
