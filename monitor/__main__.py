"""`python -m monitor` is the same as the `crystal-monitor` command."""

import sys

from monitor.cli.main import main

sys.exit(main())
