"""Test harness: an HTTP upload sink and an upload client, for measuring the proxy.

``stripe-test-target`` (:mod:`.target`) receives uploads and reports what it
got; ``stripe-test-consumer`` (:mod:`.consumer`) sends a payload to it,
directly or through a SOCKS5 proxy, and prints timings. Running the same
payload both ways shows what the overlay costs or gains, and the SHA-256
check on both ends shows that it delivered every byte intact.
"""
