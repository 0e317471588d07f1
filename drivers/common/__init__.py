"""What the drivers share below the daemon, and what the layers above them reuse: durations and
the backoff policy (`timing`), and the one piece that says whether a peer is available
(`availability`). Nothing here imports from `edge/`: the daemon builds on the drivers, never
the other way round."""
