"""`persia-inc config --defaults`: every configuration key, its default and what it means."""

from __future__ import annotations

import argparse

HELP = "print every configuration key with its default and meaning"
DESCRIPTION = """\
Print every key global_config.yaml takes, one per line: the key (dotted as in YAML), its
default, and one line on what it means, all from the settings dataclasses that read them (the
README's configuration table is generated from the same source)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--defaults", action="store_true", required=True,
                        help="print every key with its default and one line of doc")


def run(args: argparse.Namespace) -> int:
    from persia_inc.config.reference import settings_reference

    for setting in settings_reference():
        print(f"{setting.key} = {setting.default}  # {setting.doc}")
    return 0
