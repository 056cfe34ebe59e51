"""The Optuna study: storage, sampler, constraints, the trial loop and the command line."""
