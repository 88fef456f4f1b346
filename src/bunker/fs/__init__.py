"""Filesystem access shared by backup and restore: paths opened below a root one component at a
time without following symlinks, at any depth (deep_path), and every kind of metadata read and
written: owners, modes, times, xattrs, ACLs, inode flags, holes (fsmeta)."""
