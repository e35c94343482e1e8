"""Load-test harness: fastserve's mechanisms and its peers, measured over real HTTP (see README.md)."""
