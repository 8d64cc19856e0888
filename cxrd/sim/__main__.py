"""``python -m cxrd.sim``: run the simulated CloudXR runtime until SIGTERM."""

import sys

from cxrd.sim.runtime import main

sys.exit(main())
