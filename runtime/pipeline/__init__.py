"""Pipeline parallelism at run time: schedules as data (schedules.py), their executor
(executor.py) and the measured timeline (timeline.py)."""
