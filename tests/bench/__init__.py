"""`python -m tests.bench`: the mirror measured side by side with its peer and with nginx.

The peer is the distribution registry in proxy mode, the limit is nginx serving the same
file with sendfile; both sit on the same machine as the mirror, in front of the same fake
Docker Hub, and every figure comes from one run (see issue 3 for the targets).
"""
