"""Training: the loop, inference, scoring, self-describing checkpoints, one tracked run."""
