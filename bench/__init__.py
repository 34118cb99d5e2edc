"""``stripe-bench``: measure the overlay against direct TCP and plain relays.

The package is run as ``python -m bench`` (or ``stripe-bench``).
It starts every participant as its own process -- the proxy pair as real
``twistd -n`` processes, the traffic sender and sink as small stdlib
programs (:mod:`bench.traffic`) -- so that what is measured is
what a user runs, and so that CPU and memory can be read per process from
``/proc``.  Every figure is a ratio or a median over repetitions measured in
the same run, because the machines this runs on are shared and noisy.

Modules:

- :mod:`.stats` -- pure aggregation (median, percentiles, Jain's index),
  goals, the JSON report schema and the table; unit-tested.
- :mod:`.traffic` -- sender/sink/source programs (stdlib only, no Twisted,
  so the load generator is never the thing being measured).
- :mod:`.relay` -- the plain Twisted TCP and TLS relays used as baselines.
- :mod:`.procs` -- starting and watching processes, ``/proc`` readers.
- :mod:`.machine` -- what machine and software a result came from.
- :mod:`.scenarios` -- loopback, memory, latency and wan.
"""
