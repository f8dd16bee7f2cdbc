"""The cluster plugin: VM placement on hosts, capacity, and host evacuation."""
