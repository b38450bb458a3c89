"""`python -m jaxdist.plan`."""

import sys

from jaxdist.plan.cli import main

sys.exit(main())
