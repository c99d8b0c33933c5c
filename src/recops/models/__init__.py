"""Backbone loading, the two-tower model and the baselines."""
