"""Frozen values and names: the spec, what was observed (Open vSwitch, host, node), the
actions the agent takes, and every name format it makes or parses. No I/O, no decisions.
"""
