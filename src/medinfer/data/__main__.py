"""``python -m medinfer.data ...`` = ``medinfer data ...`` (metadata, cache, stats)."""

import sys

from medinfer.cli import main

if __name__ == "__main__":
    main(["data", *sys.argv[1:]])
