"""Pure readers and writers of Proxmox's and QEMU's text: VM configs, the section-config
spec file, the `args:` words, storage.cfg, the values inside a VM config. Text in, values
out and back; no I/O.
"""
