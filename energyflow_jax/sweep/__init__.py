"""Hyperparameter sweeps: grids of members trained together in one compiled program."""
