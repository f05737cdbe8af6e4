"""The data plane: the inbound and outbound proxy listeners."""
