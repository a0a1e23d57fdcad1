"""The emergence tracker: a registry of experiments and models (registry.py), what an
experiment asks (specs.py) and how it is scored (metrics.py, evaluate.py), predictions and
the loss scaling law (predict.py), the HTML report (report.py), the sweep (sweep.py) and the
`scalelab track` / `scalelab sweep` commands (commands.py)."""
