"""The night watch's eyes: a step's record and the metrics sinks (metrics.py), alert rules (alerts.py), the run
directory's files (rundir.py: step-keyed logs, whole writes; status.py: status.json, progress line, run dir), the
end-of-run summary and goodput (summary.py, goodput.py) and the HTML report (report.py)."""
