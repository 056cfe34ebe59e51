"""What a person reads afterwards: the study's records, the trials table, the Pareto front,
its plots, the report and the export's files. It reads records; it trains nothing."""
