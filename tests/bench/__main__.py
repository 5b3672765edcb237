"""Entry point: `python -m tests.bench` (what `make bench` runs)."""

from tests.bench.run import main

raise SystemExit(main())
