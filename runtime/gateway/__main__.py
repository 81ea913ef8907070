"""`python -m runtime.gateway --index N`: one gateway process, started by the supervisor."""

import argparse
import logging
import signal

from runtime.gateway.server import GatewayBindError, GatewayServer
from runtime.logs import setup_logging
from runtime.processes import EXIT_CANNOT_RUN, become_child, config_from_env, run_loop


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.gateway")
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args()
    become_child(on_parent_death=signal.SIGKILL)
    config = config_from_env()
    setup_logging(config.log_level, f"gateway-{args.index}")
    try:
        run_loop(GatewayServer(config, args.index).serve)
    except GatewayBindError as exc:
        logging.getLogger("runtime.gateway").error("%s", exc)
        return EXIT_CANNOT_RUN
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
