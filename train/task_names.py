"""The task names, once: the config's `task:`, prepare's `--task`, the shard index's "task" and
train/tasks.py's Task classes all use this tuple.

A base module that imports nothing: prepare time (no torch) and the config both read it.
"""

TASK_NAMES = ("clm", "mlm", "token-classification", "sft")
