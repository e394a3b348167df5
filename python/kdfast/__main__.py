"""`python -m kdfast ...`: the `kdfast` command line (`kdfast.cli.main`), e.g. `torchrun -m kdfast compress ...`."""

import sys

from kdfast.cli import main

if __name__ == "__main__":
    sys.exit(main())
