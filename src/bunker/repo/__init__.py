"""Repository layer: config, certificates, packs, index, references, trees, snapshots, check."""
