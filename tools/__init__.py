"""Maintenance tools: generated docs and manifests, Kustomize rendering, the live stack, the dashboard PNG."""
