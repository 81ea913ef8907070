"""Logging set-up shared by the supervisor, gateways and partitions."""

import logging
import sys

GRPC_AIO_LOGGER = "grpc._cython.cygrpc"


class AnswerTooLate(logging.Filter):
    """grpc.aio logs an ERROR, with a traceback, when the answer to a call can no longer be sent because the call
    ended meanwhile: its deadline passed (a wait that answers at the last moment, on a loop running behind) or its
    client went. The caller has its status already, and there is nothing to act on: it is logged at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith("ExecuteBatchError raised in core"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger(GRPC_AIO_LOGGER).addFilter(AnswerTooLate())
