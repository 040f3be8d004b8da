"""``python -m medinfer`` is the ``medinfer`` command."""

from medinfer.cli import main

if __name__ == "__main__":
    main()
