"""`python -m swarm.dashboard`: see `swarm.dashboard.app`."""

import sys

from swarm.dashboard.app import main

if __name__ == "__main__":
    sys.exit(main())
