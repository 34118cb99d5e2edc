"""The pure layer: codecs, negotiation state machines, the session core and the scheduler.

Nothing here imports ``twisted.internet``: time arrives as an argument and
output leaves as return values, so every module is tested without sockets.
"""
