"""Experiment protocols (the survey's Table II) and their reports."""
