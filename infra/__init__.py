"""Deployment: compose files, the Dockerfile and the KubeRay job beside `stack/`, the local stack."""
