"""Hydra configs shipped as package data (`pkg://moeflow.configs`)."""
