"""Tar streams: `export-tar` writes a snapshot as a POSIX pax archive (writer), `backup --tar`
stores a tar or pax stream as a snapshot, holding every member to the tree rules (reader)."""
