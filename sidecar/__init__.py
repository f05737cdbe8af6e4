"""gts-sidecar: a per-pod distributed-transaction sidecar for services in any language."""

__version__ = "0.1.0"
