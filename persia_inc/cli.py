"""`persia-inc`: one command line for every part of the pipeline.

Each subcommand lives in `persia_inc.commands.<name>` and exposes `HELP` (one line),
`DESCRIPTION`, `add_arguments(parser)` and `run(args) -> int`. Command modules keep their
heavy imports inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Sequence

# Subcommand name -> module. Order is the order `--help` lists them in.
COMMANDS: dict[str, str] = {
    "inspect": "persia_inc.commands.inspect",
    "demo": "persia_inc.commands.demo",
    "embedding-server": "persia_inc.commands.embedding_server",
    "checkpoint": "persia_inc.commands.checkpoint",
    "loader": "persia_inc.commands.loader",
    "replay": "persia_inc.commands.replay",
    "status": "persia_inc.commands.status",
    "serve": "persia_inc.commands.serve",
    "rollback": "persia_inc.commands.rollback",
    "config": "persia_inc.commands.config",
}

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persia-inc",
        description=(
            "Ship incremental sparse-embedding updates from training to the embedding servers "
            "that serve them: packets on local disk, HDFS or Ceph, announced by file or Kafka, "
            "hot-applied in order."
        ),
        epilog="Run 'persia-inc COMMAND --help' for a command's options.",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity on stderr (default: INFO)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser `args` chose, however deep (`checkpoint save`)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name is None:
            return parser
        parser = subs[0].choices[name]


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, except that an unknown option is reported by the subcommand it
    was given to, with that subcommand's usage and the nearest option it has."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        chosen = _chosen(parser, args)
        options = [s for a in chosen._actions for s in a.option_strings]
        near = difflib.get_close_matches(unknown[0].split("=", 1)[0], options, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        chosen.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    configure_logging(args.log_level)
    from persia_inc.config import ConfigError

    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"persia-inc {args.command}: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
