"""The benchmark: measure the overlay against direct TCP and plain relays.

It lives beside the product, not in its wheel: run it from a checkout, in
an environment where stripeproxy is installed (``scripts/test`` or
``scripts/run-local`` make ``.venv``), as ``.venv/bin/python -m bench``.

The loopback scenarios (loopback, memory, latency, setup) need nothing more.  The
WAN scenarios (wan, degraded) need **root and network namespaces**
(``ip netns``) and a link emulator: ``--wanem DIR`` or ``$STRIPE_WANEM``
naming a wanem-style userspace emulator, else kernel ``tc netem`` when the
kernel has it (:mod:`.link`).  Without one they are skipped with a message
saying how to get one, and the other scenarios still run.

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
- :mod:`.link` -- the emulated WAN link (wanem or netem) and how it is found.
- :mod:`.loopback`, :mod:`.memory`, :mod:`.latency`, :mod:`.setup`, :mod:`.wan`,
  :mod:`.degraded` -- the scenarios.
"""
