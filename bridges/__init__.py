"""Bridges from off-the-shelf sensors to the platform's UDP protocol (see udpserver/PROTOCOL.md)."""
