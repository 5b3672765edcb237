"""Replicas: several mirrors sharing one bucket and one Redis, one upstream fetch per digest.

settings.py   the `cluster:` config section (advertise URL, shared secret, lease TTL)
lease.py      leases in Redis: who downloads a digest, who revalidates a tag, who evicts
peerauth.py   the cluster secret as signed headers on replica-to-replica requests
"""
