"""``python -m worker`` is ``rc-worker``."""

from worker.cli import main

raise SystemExit(main())
