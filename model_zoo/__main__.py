"""`python -m model_zoo` runs the model zoo's command line."""

import sys

from model_zoo.cli import main

sys.exit(main())
