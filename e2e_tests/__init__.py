"""End-to-end tests against a real Kubernetes API: a local control plane (see localcluster.py) or KUBECONFIG."""
