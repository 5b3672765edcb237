"""The client side of registries: requests, tokens, credentials, routing, breakers."""
