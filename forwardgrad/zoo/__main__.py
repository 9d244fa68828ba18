"""``python -m forwardgrad.zoo``: measure the zoo and print its state table (Markdown)."""

from __future__ import annotations

import argparse
import sys

from forwardgrad.zoo.registry import CASES, SIZES, get_case
from forwardgrad.zoo.table import format_table, state_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forwardgrad.zoo",
        description="Check the forward gradient on the zoo's models against autograd and time "
        "a K = 1 step against backprop (one thread).",
    )
    parser.add_argument("models", nargs="*", help=f"case names (default: all): {', '.join(CASES)}")
    parser.add_argument("--size", choices=SIZES, default="bench")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (default 7)")
    args = parser.parse_args(argv)
    for name in args.models:
        try:
            get_case(name)
        except ValueError as error:
            parser.exit(2, f"error: {error}\n")
    if args.rounds < 1:
        parser.exit(2, "error: --rounds must be at least 1.\n")
    skipped = [c.unavailable() for c in CASES.values() if c.unavailable()]
    if skipped:
        print(f"skipped {len(skipped)} cases: {skipped[0]}", file=sys.stderr)
    rows = state_table(
        args.models or None,
        args.size,
        args.rounds,
        progress=lambda name: print(f"measuring {name}", file=sys.stderr, flush=True),
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
