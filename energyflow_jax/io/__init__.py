"""What runs leave on disk: atomic files, checkpoints, metrics, resume guards."""
