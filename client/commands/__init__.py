"""The ``fedrad-node`` subcommands, one module each (heavy imports inside the functions)."""
