"""The cache services, free of HTTP: manifests, blob downloads, referrers, tag lists, eviction."""
