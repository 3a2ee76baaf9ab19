"""`python launch_cli.py train ...`: the training subcommands as `dsv3` runs them, for torchrun in tests."""

import argparse
import sys

from dsv3.errors import DsV3Error
from dsv3.training.commands import add_commands

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="dsv3")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    try:
        sys.exit(args.fn(args))
    except DsV3Error as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
