"""Parallelism: the device mesh and logical-axis shardings (sharding.py) and multi-process setup
(distributed.py). Model math never mentions devices; this is the one place that does.

May import: config/.
"""
