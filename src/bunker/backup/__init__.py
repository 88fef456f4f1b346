"""Backing up with the put key (docs/security.md section 3): walking and reading files (archiver, file
readers, small-file batches, hard links, owners), the files cache, content-defined chunking and
storing chunks and trees, checkpoints of a running backup and what becomes of a killed run's
(resume, partial trees, adoption), and committing a snapshot onto the client's chain. Never loads
the master key."""
