"""`python -m nova`: every processor in one process; with arguments, the `nova` command."""

import sys

if len(sys.argv) > 1:
    from nova.cli import main as cli

    raise SystemExit(cli())

from nova.service import main as serve

raise SystemExit(serve())
