"""The Kubernetes control plane (kopf operator) around the pure policy core."""
