"""Pytest-free helpers that start private daemons and sandboxes, shared by the tests
(tests/fixtures/ wraps them as fixtures), the demo (scripts/demo-cycle) and the bench
(bench/run). Never shipped: setup.cfg packages only `pve_vhost_agent*`.

    ovs      a private ovsdb-server + ovs-vswitchd (userspace or DPDK), stopped by PID
    journald a private systemd-journald in its own mount namespace
    guest    a tiny real guest image: Debian's kernel, busybox, an initramfs that pings
    linkguest the same image in a second mode for VM-to-VM links: LLDP frames, an STP bridge
    frames   raw frames in and out of a namespace (tags as on the wire), a peer that answers
    pvenode  a Proxmox-like root for the agent (`--root`): VM configs, the spec file,
             stand-in running VMs and the sockets QEMU would serve
"""
