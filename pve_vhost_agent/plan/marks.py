"""Where the Proxmox GUI shows that the agent holds a VM's NICs: a tag and a notes line. Pure.

The GUI knows nothing of the agent: its "Add network device" takes the lowest free netN,
which may be a vhost-user NIC of the agent (the start then aborts). So an enabled VM with
vhost-user NICs carries, in its config's main section:

- the tag `vhost-user` in `tags:` (shown next to the VM's name in the tree and header);
- one line in its notes (the `#` description lines), e.g.
  `pve-vhost-agent: vhost-user NICs net1 (br-vhost), net2 (br-vpp); Proxmox NICs need other netN`.

Both are kept in step with the spec by whatever writes the VM's args (`enable`, `apply`,
`nic ...`, the service) and removed by `disable` (or when no vhost-user NIC is left). The
user's own tags and notes are never touched: only the agent's tag and the one line that
starts with `pve-vhost-agent:`. Proxmox writes tags and notes of a running VM at once (no
pending change), and so does the agent.
"""

from __future__ import annotations

from typing import Sequence

from pve_vhost_agent.formats.vmconfig import MAIN, VmConfig, encode_text, tag_list, with_tag
from pve_vhost_agent.model.spec import VhostNic

TAG = "vhost-user"
NOTE_PREFIX = encode_text("pve-vhost-agent: ")


def note_line(nics: Sequence[VhostNic]) -> str:
    """The notes line for these NICs, encoded as qemu-server writes description lines."""
    named = ", ".join(f"{nic.name} ({nic.bridge})" for nic in sorted(nics, key=lambda n: n.index))
    return encode_text(f"pve-vhost-agent: vhost-user NICs {named}; Proxmox NICs need other netN")


def with_marks(config: VmConfig, nics: Sequence[VhostNic]) -> VmConfig:
    """`config` marked for `nics` (none: the agent's marks removed)."""
    tags = config.section(MAIN).get("tags", "")
    new_tags = with_tag(tags, TAG, bool(nics))
    if new_tags != tags:
        config = config.with_value("tags", new_tags or None)
    return config.with_description_line(NOTE_PREFIX, note_line(nics) if nics else None)


def mark_changes(before: VmConfig, after: VmConfig) -> tuple[str, ...]:
    """What `with_marks` changed, in an operator's words."""
    changes = []
    had, has = (TAG in tag_list(c.section(MAIN).get("tags", "")) for c in (before, after))
    if had != has:
        changes.append(f"tag {TAG} {'added' if has else 'removed'}")
    note = [[line for line in c.description_lines() if line.startswith(NOTE_PREFIX)] for c in (before, after)]
    if note[0] != note[1]:
        changes.append("notes line " + ("removed" if not note[1] else "added" if not note[0] else "updated"))
    return tuple(changes)
