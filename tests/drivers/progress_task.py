"""One OS process reporting a task's progress as a data tool does, for the display tests.

Run as ``python -m tests.drivers.progress_task [--quiet] [--log-format json|console] --units N``.
It configures logging and the progress display exactly as ``rc-worker`` does for the stderr it
was given (a terminal or a pipe), then reports N units over two partitions, one every few
milliseconds, every tenth a duplicate and every twenty-fifth a dead letter, and prints
``done N`` on stdout. Without Kafka, so the display can be checked on its own.
"""

from __future__ import annotations

import argparse
import time

from worker import logs
from worker.config import LoggingSettings
from worker.tools import progress


def main() -> None:
    """Parse the arguments and run the task."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=60)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--log-format", default="auto", choices=("auto", "json", "console"))
    args = parser.parse_args()
    settings = LoggingSettings(format=args.log_format)
    logs.configure(settings, level="warning" if args.quiet else None)
    progress.configure(progress.choose(quiet=args.quiet, log_format="json" if logs.as_json(settings) else "console"))
    half = args.units // 2
    with progress.Progress("demo", args.units, unit="events", partitions={0: half, 1: args.units - half}) as task:
        for unit in range(args.units):
            time.sleep(0.01)
            task.advance(1, partition=unit % 2, duplicates=int(unit % 10 == 0), dead_letters=int(unit % 25 == 0))
    print(f"done {args.units}", flush=True)


if __name__ == "__main__":
    main()
