"""`task=dataset_distill`: the student is a small synthetic training set (docs/ARCHITECTURE.md)."""
