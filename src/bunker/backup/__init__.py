"""Backup and restore layer: scanning, files cache, chunk pipeline, restore, verify."""
