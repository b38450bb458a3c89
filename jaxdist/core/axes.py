"""The names of the mesh axes, shared by every layer that builds or reduces over them."""

DATA_AXIS = "data"
# outermost to innermost: pipeline stages, data-parallel groups, FSDP shards, expert groups
# (expert parallelism moves tokens between them), context splits of the sequence (attention
# passes keys and values between them every layer), tensor splits
MESH_AXES = ("pipeline", "data", "fsdp", "expert", "context", "tensor")
