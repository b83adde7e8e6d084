"""`python -m nova`: every processor in one process; with arguments, the `nova` command."""

import sys

if len(sys.argv) > 1:
    from nova.cli import main
else:
    from nova.service import main

raise SystemExit(main())
