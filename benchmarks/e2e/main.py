"""Benchmark whole training steps (see README.md). Same as `largebatch bench --e2e`."""
import sys

from largebatch.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--e2e", *sys.argv[1:]]))
