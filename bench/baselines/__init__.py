"""The servers fastserve is compared with, and the HTTP ceiling: each runs in its own process."""
