"""`python -m colocate.bench <name> ...` is `python -m colocate bench <name> ...`."""

import sys

from colocate.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
