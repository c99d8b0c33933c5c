"""Training, evaluation, export and the training report."""
