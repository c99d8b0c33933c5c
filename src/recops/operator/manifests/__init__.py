"""Kubernetes objects as pure functions of a custom resource and the operator settings."""
