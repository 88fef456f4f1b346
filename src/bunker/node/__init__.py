"""Node layer: serving a repository to other machines (and later forwarding, receipts, mirrors)."""
