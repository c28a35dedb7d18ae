"""The contributor side of swarm: serving a range of blocks to clients."""
