"""Observe, plan, apply: hook phases, the service pass, apply/enable/nic. The only place
that joins planners and adapters.
"""
