"""`python -m monitor` is the same as the `crystal-monitor` command."""

import sys

from monitor.cli import main

sys.exit(main())
