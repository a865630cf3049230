"""NAT traversal: NAT detection, candidates, hole punching and path management."""
