"""pve-vhost-agent: vhost-user NICs and QinQ ports for Proxmox VE VMs, declared once."""

__version__ = "0.1.0"
