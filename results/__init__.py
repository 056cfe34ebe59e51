"""What a person reads afterwards: the trials table, the Pareto front and its plots."""
