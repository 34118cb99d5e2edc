"""Operations: sliding-window counters, the terminal dashboard and the
Prometheus endpoint shared by both taps.
"""
