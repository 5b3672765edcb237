"""Replicas: several mirrors sharing one bucket and one Redis, one upstream fetch per digest.

lease.py        leases in Redis: who downloads a digest, who revalidates a tag, who evicts
shared.py       work one replica does for all (tags, manifests); the others wait for it
blobflight.py   where a download's bytes come from: the upstream, or the blob's owner
peers.py        the client replicas stream blobs from each other with
peerauth.py     the cluster secret as signed headers on replica-to-replica requests
signing.py      the client token key every replica shares
bucketshare.py  the bucket's chores (eviction, abandoned uploads) told apart by leases
"""
