"""`python -m nova`: the `nova` command."""

from nova.cli import main

raise SystemExit(main())
