"""Experiments: each is a thin train_and_evaluate(config, workdir) over the library."""
