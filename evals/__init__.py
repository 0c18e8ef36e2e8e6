"""Evaluators: kNN, linear probe, fine-tune and transfer; each returns metrics for the one results schema."""
