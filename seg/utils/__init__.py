"""Small helpers the rest of the package shares: atomic file writes, torchrun and ranks, progress
lines, and the images (masks, grids, CA maps) that go to TensorBoard."""
