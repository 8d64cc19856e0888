"""Health for orchestrators: ``/livez``, ``/readyz`` and ``/metrics`` over plain HTTP.

:mod:`cxrd.health.report` decides readiness and writes the JSON bodies (pure);
:mod:`cxrd.health.metrics` turns a snapshot into Prometheus metrics;
:mod:`cxrd.health.server` serves them on ``health.listen`` from the daemon's
loop, so an answer also proves that the loop runs.
"""
