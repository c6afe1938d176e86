"""Ray jobs composed from the `p2p` library: ingest (profiles), train, refresh, serve."""
