"""sliceproxy: a node-level Kubernetes service proxy."""

__version__ = "0.1.0"
