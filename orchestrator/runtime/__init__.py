"""What a run stands on: joining or starting Ray (cluster.py) and the watchdog that outlives a killed driver
(watchdog.py), signals (signals.py), one live run per directory (runlock.py), a full disk (disk.py), and the run's
input files checked before Ray starts (preflight.py)."""
