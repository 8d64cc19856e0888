"""A simulator of the CloudXR runtime's observable contract, for tests, demos and CI.

Run it as ``python -m cxrd.sim`` (see :mod:`cxrd.sim.runtime`); its knobs are
the ``CXRD_SIM_*`` variables of :mod:`cxrd.sim.faults`. It is not NVIDIA
CloudXR and says so on stderr, in its server log and in its WebSocket
``Server`` header. Kept import-free so ``python -m cxrd.sim`` starts fast.
"""
