"""Scale-out: mesh from config, the axis-rules table, applying it (DTensor/FSDP2), planner."""
