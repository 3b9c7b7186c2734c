"""One rank of a job: preflight, engine, the loop, eval, checkpoints, export, and what keeps a
job alive (health, watchdog, stragglers, preemption). The module map is in train/__init__.py.
"""
