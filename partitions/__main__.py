"""`python -m partitions --index N`: one partition process, started by the supervisor."""

import argparse
import sys

import lmdb

from partitions.process import (
    PartitionBusyError,
    PartitionDataError,
    PartitionEndpointError,
    PartitionProcess,
)
from runtime.logs import setup_logging
from runtime.processes import EXIT_CANNOT_RUN, become_child, config_from_env, run_loop


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m partitions")
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args()
    become_child()
    config = config_from_env()
    setup_logging(config.log_level, f"partition-{args.index}")
    try:
        process = PartitionProcess(config, args.index)
    except PartitionDataError as exc:
        print(f"durable-runtime: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except PartitionBusyError as exc:  # say, a partition of a node that is still dying: retried with backoff
        print(f"durable-runtime: {exc}", file=sys.stderr)
        return 1
    except lmdb.Error as exc:  # e.g. no space to start a new epoch: the supervisor retries with backoff
        print(f"durable-runtime: partition {args.index} could not open its store: {exc}", file=sys.stderr)
        return 1
    try:
        run_loop(process.serve)
    except PartitionEndpointError as exc:
        print(f"durable-runtime: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
