"""The guest lab: small C guests that reproduce Xen 2-level event delivery, and their launchers."""
