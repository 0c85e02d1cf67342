"""Stateful Ray workers. Each stage class builds its model once in `__init__` (its setup) and
handles one batch of shards per call; resources are declared next to it in `STAGE_RESOURCES`-style
helpers of ray_jobs. Nothing here decides how the work is scheduled."""
