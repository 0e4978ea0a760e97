"""``python -m oxbus.cli``: the same as ``python -m oxbus``."""

from oxbus.cli import main

if __name__ == "__main__":
    main(prog_name="oxbus")
