"""The train state: its creation, the jitted steps over it, its sharding and its checkpoints."""
