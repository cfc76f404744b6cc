"""Sharding: mesh.py (MeshConfig, make_mesh), rules.py (logical -> mesh axes), context.py (sharding_context,
constrain), init.py (sharded abstract init, pure-dict <-> nnx round trip), expert_parallel.py (shard_map MoE),
distributed.py (multi-host start-up). Import the submodules directly: models import `context`, and `init`
imports models, so this package imports nothing itself."""
