"""Pipeline schedules on the command line: bubble figures, the per-rank order as JSON, a picture.

  python -m deepseek_jax.schedule --schedule=dualpipe --ranks=8 --microbatches=20 \
      [--png=out.png] [--json] [--costs=F=1,B=2,Bi=1,W=1,FB=3]

Without --schedule, prints the bubble table of every schedule. --ranks is the number of pipeline
ranks (the `pipe` mesh axis; DualPipeV runs 2x as many model stages on them). --microbatches is
the total per step (DualPipe's num_chunks: half enter at each end). Bad arguments exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from deepseek_jax import errors
from deepseek_jax.parallel.pipeline import costmodel, report, schedules


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deepseek_jax.schedule",
        description="Pipeline schedule bubbles, per-rank op orders and timeline pictures.",
    )
    p.add_argument(
        "--schedule",
        choices=[s.value for s in schedules.SCHEDULES],
        help="one schedule (default: the bubble table of all of them)",
    )
    p.add_argument("--ranks", type=int, default=8, help="pipeline ranks (default 8)")
    p.add_argument(
        "--microbatches", type=int, default=20, help="micro-batches per step, in total (default 20)"
    )
    p.add_argument(
        "--costs",
        default="",
        help="per-op costs, e.g. F=1,B=2,Bi=1,W=1,FB=3 (these are the defaults)",
    )
    p.add_argument("--png", help="write the timeline picture here (needs --schedule)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the per-rank order and bubble figures as JSON (needs --schedule)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        costs = costmodel.Costs.parse(args.costs)
    except ValueError as e:
        parser.error(f"--costs: {e}")
    if args.ranks <= 0 or args.microbatches <= 0:
        parser.error("--ranks and --microbatches must be positive")
    if (args.png or args.json) and not args.schedule:
        parser.error("--png and --json need --schedule")

    only = schedules.Schedule(args.schedule) if args.schedule else None
    rows = report.summaries(args.ranks, args.microbatches, costs, only)
    failed = [row for row in rows if isinstance(row, tuple)]
    if only and failed:
        parser.error(failed[0][1])
    if len(failed) == len(rows):
        parser.error(
            "no schedule accepts these arguments: " + "; ".join(f"{n}: {why}" for n, why in failed)
        )

    if args.json:
        orders = schedules.build(only, args.ranks, args.microbatches)
        print(json.dumps(report.document(orders, rows[0], costs)))
    else:
        print(report.text(rows, costs))
    if args.png:
        report.png(schedules.build(only, args.ranks, args.microbatches), args.png, costs)
        if not args.json:
            print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.guard(main)())
