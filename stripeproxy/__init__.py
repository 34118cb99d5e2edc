"""stripeproxy: one TCP stream striped across several prewarmed subflows."""

__version__ = "0.1.0"
