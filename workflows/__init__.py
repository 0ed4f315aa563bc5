"""Dipy-style workflows and command-line entry points of esdmri."""
