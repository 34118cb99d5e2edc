"""Twisted adapters: the thin protocols, factories and services that bind
the pure core to sockets, TLS and the reactor.
"""
