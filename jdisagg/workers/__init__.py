"""Prefill and decode workers as separate processes, and the front that schedules them.

The front (``front.py``) runs the same ``Engine`` as in-process serving, over proxies of worker processes
(``remote.py``); workers (``worker.py``) own devices and run the compiled programs; the KV moves between
them with JAX's transfer server (``handoff.py``).
"""
