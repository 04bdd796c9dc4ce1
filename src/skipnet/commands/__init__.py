"""CLI subcommands; every public module here is discovered by :mod:`skipnet.cli`."""
