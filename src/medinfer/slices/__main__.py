"""``python -m medinfer.slices ...`` = ``medinfer slices ...`` (export, reconstruct)."""

from medinfer.slices.cli import main

if __name__ == "__main__":
    main(prog_name="python -m medinfer.slices")
