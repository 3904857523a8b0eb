"""/etc/pve/datacenter.cfg, the cluster's options: only what the agent uses of it. Pure."""

from __future__ import annotations

from pve_vhost_agent.model.spec import check_mac_prefix


def mac_prefix(text: str) -> str | None:
    """The `mac_prefix:` Proxmox gives its own new NICs (None: not set)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "mac_prefix" and value.strip():
            return check_mac_prefix(value.strip())
    return None
