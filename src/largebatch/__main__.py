"""``python -m largebatch ...``: the same as the ``largebatch`` command."""
import sys

from largebatch.cli.main import main

sys.exit(main())
