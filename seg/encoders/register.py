"""Adds our encoder names to smp's encoder table (filled in with the encoders)."""
