"""``python -m bench``: how much faster than what you use now, on your GPU.

Modules: ``shapes`` (shapes, ops, bytes moved), ``metrics`` (bandwidth, shares, speed-ups),
``impls`` (the peer registry), ``timing`` (torch timing, copy floor, host overhead),
``jax_timing`` (CUPTI device time for JAX), ``runner`` (the measurement loop), ``report``
(stdout table, JSON, markdown, PNG) and ``__main__`` (the command line).
"""
