"""A/B experiment statistics: fixed-horizon and always-valid sequential tests, SRM checks."""
