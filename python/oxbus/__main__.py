"""``python -m oxbus``: the ``oxbus`` command line."""

from oxbus.cli import main

if __name__ == "__main__":
    main(prog_name="oxbus")
