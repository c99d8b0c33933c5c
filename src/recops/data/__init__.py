"""Log parsing, cleaning, sessions, samples, splits and dataset loaders."""
