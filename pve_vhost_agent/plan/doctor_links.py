"""The doctor's checks of VM-to-VM links: can each link end of this node's VMs reach its
peer, and can the underlay carry its guest frames whole. Pure: the declarations and the
link facts (where the peers are, the nodes' cluster addresses, the interface holding this
node's address and its MTU; adapters/links.py reads them) in, findings out.

The same judgement as pre-start's (plan/links.py: `end_socket`, `underlay_shortfall`),
for every VM of this node, running or not, so a link that would fragment or stay dark is
found before its VM starts.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from pve_vhost_agent.model.findings import Finding, Severity
from pve_vhost_agent.model.links import LinkFacts
from pve_vhost_agent.model.spec import ClusterSpec, VmSpec
from pve_vhost_agent.plan.links import EndSocket, end_socket, underlay_shortfall
from pve_vhost_agent.plan.observed import LocalVm


def findings(declared: Sequence[tuple[LocalVm, VmSpec]], spec: ClusterSpec | None, facts: LinkFacts | None,
             problem: str) -> Iterator[Finding]:
    """Findings about the link ends this node's VMs declare (and links one end lost)."""
    if spec is not None:
        for text in spec.link_problems():
            what, _, fix = text.partition("; ")
            yield Finding(Severity.ERROR, "links", f"{what}: that link is dark", fix, "link-one-sided")
    ends = [end for _vm, vm_spec in declared for end in vm_spec.links]
    if not ends:
        return
    if facts is None:
        yield Finding(Severity.WARNING, "links", f"the link ends were not checked: {problem}",
                      "run the doctor as root on the node", "links-unreadable")
        return
    for end in ends:
        subject = f"VM {end.vmid} {end.name}"
        peer_node = facts.nodes.get(end.peer[0])
        want = end_socket(end, facts.here, peer_node, facts.addresses)
        if not isinstance(want, EndSocket):
            fix = (f"remove the link: pve-vhost-agent link remove {end.end}" if peer_node is None
                   else "give every node a ring0_addr of one IP version in /etc/pve/corosync.conf")
            yield Finding(Severity.ERROR, subject, f"the link to {end.peer_end} is dark: {want}", fix, "link-dark")
            continue
        if want.peer_node == facts.here:
            continue  # loopback carries any frame
        device, mtu = facts.underlay
        shortfall = underlay_shortfall(end, want.local[0], device, mtu)
        if shortfall is not None:
            severity, check = (Severity.ERROR, "link-address") if mtu is None else (Severity.WARNING, "link-underlay-mtu")
            yield Finding(severity, subject, shortfall[0], shortfall[1], check)
