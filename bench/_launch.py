"""Tiny exec wrapper: `python -m bench._launch PARENT_PID -- cmd args...`

Sets PR_SET_PDEATHSIG(SIGTERM) so the child is signalled if the harness dies
without running its cleanup (e.g. SIGKILL), then exec()s the real command.
"""
import ctypes
import os
import signal
import sys


def main() -> None:
    parent = int(sys.argv[1])
    assert sys.argv[2] == "--"
    cmd = sys.argv[3:]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent:  # parent already gone
        sys.exit(1)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
