"""The memory puzzle: the plan of bytes per device and category before anything starts (plan.py, its refusal names
the knob), its text jigsaw (render.py), and what a device measures of itself (measure.py)."""
