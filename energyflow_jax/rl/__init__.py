"""Reinforcement learning on learned rewards."""
