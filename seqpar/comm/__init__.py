"""Communication backends (one file each) and the primitives they share."""
