"""`largebatch train` vs a minimal loop vs HF Trainer on the main job's work (see README.md, "toolkit").
Same as `largebatch bench --toolkit`."""
import sys

from largebatch.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--toolkit", *sys.argv[1:]]))
