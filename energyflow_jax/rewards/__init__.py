"""Rewards read out of a trained energy, and the adversarial IRL baseline."""
