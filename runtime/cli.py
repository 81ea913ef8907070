"""The `durable-runtime` command: run a node (default)."""

from __future__ import annotations

import sys

from runtime.config import build_parser, config_from
from runtime.logs import setup_logging
from runtime.supervisor import DataDirError, Supervisor


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(config.log_level, "supervisor")
    try:
        return Supervisor(config).run()
    except DataDirError as exc:
        print(f"durable-runtime: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
