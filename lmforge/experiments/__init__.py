"""Experiment management: hyperparameter sweeps over any command, and the run registry."""
