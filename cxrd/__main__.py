"""``python -m cxrd``: the daemon, as the unit that ``cxrctl install`` writes runs it."""

from cxrd.daemon import main

raise SystemExit(main())
