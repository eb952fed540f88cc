"""Pretraining: the launch, the loop, checkpoints, the run log, export."""
