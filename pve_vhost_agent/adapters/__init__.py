"""The edges: the only code that touches Open vSwitch (OVSDB IDL), files (/etc/pve, /run,
locks), netlink (pyroute2), journald, sockets and subprocesses. One job per module;
low-level errors become the agent's errors here. No planning.
"""
