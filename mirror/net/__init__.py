"""Transport helpers shared by the server and the clients: TLS contexts."""
