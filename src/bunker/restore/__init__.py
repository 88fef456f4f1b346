"""Reading snapshots back: the restorer (trees to files, directories, links, devices and their
metadata, in worker processes), file writers, and `verify` (proving with the put key that local
files are stored). Every path is opened below its root without following symlinks (bunker.fs)."""
