"""The micro world: a synthetic world small enough that every training stage runs on a CPU.

See :mod:`kosmos_g.micro.world` for the scene renderer and the shard-sample builders.
"""
