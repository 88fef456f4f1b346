"""check and verify (filled in below)."""
