"""The memory agent: prompts, chunking, generation backends, the read-and-overwrite loop, and its trajectories."""
