"""Subcommands of `persia-inc`; see `persia_inc.cli`."""
