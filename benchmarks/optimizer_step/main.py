"""Benchmark one optimizer step (see README.md). Same as `largebatch bench`."""
import sys

from largebatch.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
