"""`python -m cxrd.cli`: the same as `cxrctl`."""

import sys

from cxrd.cli.main import main

sys.exit(main())
