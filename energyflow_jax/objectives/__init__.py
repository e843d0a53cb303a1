"""Training objectives. Each file is one objective: its noise schedule, loss and sampler."""
