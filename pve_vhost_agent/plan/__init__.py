"""Pure deciders: desired state (spec, VM config) and observed state in; actions, refusals
and warnings out. Same inputs, same plan. No I/O and no logging: flows do both.
"""
