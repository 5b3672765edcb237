"""The client token signing key of a cluster: derived from the cluster secret.

Every replica must check the tokens every other one issued. Rather than one more file to
distribute, each derives the same key from the secret they share already. The label keeps
the token key apart from the secret's other use (signing replica-to-replica requests): a
token key that leaked would not let anyone pose as a replica.
"""

from __future__ import annotations

import hashlib
import hmac

TOKEN_KEY_LABEL = b"mirror/v1/client-token-signing-key"
AUDIENCE_LABEL = b"mirror/v1/client-token-audience"


def token_signing_key(cluster_secret: bytes) -> bytes:
    """HMAC-SHA256(secret, label), hex: the HKDF-Expand of one block, in effect."""
    return hmac.new(cluster_secret, TOKEN_KEY_LABEL, hashlib.sha256).hexdigest().encode()


def token_audience(cluster_secret: bytes) -> str:
    """The audience of a cluster's tokens when no public_url names the service: the same on
    every replica (each is reached at its own address), another cluster's never."""
    tag = hmac.new(cluster_secret, AUDIENCE_LABEL, hashlib.sha256).hexdigest()[:16]
    return f"mirror-cluster-{tag}"
