"""qlab: a lab for QUIC NAT traversal (Intermediate Server, App Connector and Agent behind NATs)."""

__version__ = "0.1.0"
