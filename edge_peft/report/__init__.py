"""``edge-peft report``: a run's metrics as an HTML page with one PNG per chart (matplotlib, the [report] extra)."""
