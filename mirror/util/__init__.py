"""Small generic helpers: an LRU, a single flight, sizes for people, file locks."""
