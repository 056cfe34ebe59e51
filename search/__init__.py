"""Every job that drives work: options and their checks, the Optuna study and storages,
the search loop, workers, crash supervision, the export's retraining, the Python API
(search/api.py) and the command line (search/cli.py)."""
