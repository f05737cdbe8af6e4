"""The coordinator: GTS REST v1 (protocol, signing, client, server) and the transaction engine."""
