"""`python -m refilled.serve`: the fork server's process (refilled.tools.forkserver). It sits on
top with the command line because what it serves is the command line: each job's `refilled`
command runs through `refilled.cli.main` in a child forked from this warm process."""

from __future__ import annotations

import argparse
import sys

from refilled.cli import main as run_command
from refilled.tools import forkserver


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refilled.serve", description=forkserver.__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default=forkserver.SOCKET_NAME,
                        help=f"the socket to listen on (default {forkserver.SOCKET_NAME})")
    parser.add_argument("--parent", type=int, help="stop when this process (Snakemake) ends")
    args = parser.parse_args(argv)
    return forkserver.Server(args.socket, args.parent, run_command).serve()


if __name__ == "__main__":
    sys.exit(main())
