"""Example third-party vmkernel plugin: a per-owner VM quota and a read-only role."""
