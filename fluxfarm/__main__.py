"""`python -m fluxfarm ...` runs the `fluxfarm` command (what the tests and the demo start as subprocesses)."""

from fluxfarm.cli import main

if __name__ == "__main__":
    main()
