"""Training: the Composer model, the config schema, parallelism and the entry points."""
