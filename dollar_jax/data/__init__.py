"""Data: the procedural shapes world, ArrayRecord datasets, grain input pipelines, text conditioning."""
