"""The names of the mesh axes, shared by every layer that builds or reduces over them."""

DATA_AXIS = "data"
# outermost to innermost: pipeline stages, data-parallel groups, FSDP shards, tensor splits
MESH_AXES = ("pipeline", "data", "fsdp", "tensor")
