"""`kosmos-g` subcommands: one module each, exposing ``register(subparsers)``."""
