"""The `pve-vhost-agent` command (main.py: the click group, one module per command group)
and the hookscript's own entry (hookscript.py: no click, so a VM start loads only what it
uses). Click and output formatting only: the work is in flows/.
"""
