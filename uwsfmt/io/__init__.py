"""Storage: Zarr arrays and shards, the commit protocol and locks, I/O overlap."""
