"""The `durable-runtime` command: run a node (default), or administer a running one (`instances`, `entities`)."""

from __future__ import annotations

import sys

from runtime.config import build_parser, config_from

ADMIN_COMMANDS = ("instances", "entities")
ADMIN_EPILOG = (
    "Admin commands, against a running node over gRPC: "
    "'durable-runtime instances {list,show,history,terminate,suspend,resume,purge,restart,rewind} ...' and "
    "'durable-runtime entities {list,show} ...'; see 'durable-runtime instances --help' and docs/admin-cli.md."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ADMIN_COMMANDS:
        from runtime.admin import main as admin_main

        return admin_main(argv)
    return run_node(argv)


def run_node(argv: list[str]) -> int:
    from runtime.logs import setup_logging
    from runtime.supervisor import StartupError, Supervisor

    parser = build_parser()
    parser.epilog = ADMIN_EPILOG
    args = parser.parse_args(argv)
    try:
        config = config_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(config.log_level, "supervisor")
    try:
        return Supervisor(config).run()
    except StartupError as exc:
        print(f"durable-runtime: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
