"""`python -m swarm.api`: see `swarm.api.app`."""

import sys

from swarm.api.app import main

if __name__ == "__main__":
    sys.exit(main())
