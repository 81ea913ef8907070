"""`python -m runtime` runs the same command line as the `durable-runtime` script."""

from runtime.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
