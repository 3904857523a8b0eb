"""One real-kernel test file on Debian 12 and Debian 13 (Proxmox VE 8 and 9): each release's
kernel boots with its own root (bookworm's package keeps modules in lib/modules, trixie's in
usr/lib/modules; Python 3.11 and 3.13), and both kernels build an 802.1ad VLAN-aware bridge
and a bond through pyroute2. A guest per release (tests/fixtures/kernelvm.py); each test
is reported as `<test>@<release>`.
"""

import os
import platform
import sys

import pytest
from pyroute2 import IPRoute

pytestmark = pytest.mark.real_kernel(releases=("bookworm", "trixie"))

KERNELS = {"bookworm": "6.1.", "trixie": "6.12."}
PYTHONS = {"bookworm": (3, 11), "trixie": (3, 13)}
ETH_P_8021AD = 0x88A8


def release() -> str:
    return platform.freedesktop_os_release()["VERSION_CODENAME"]


def test_the_guest_boots_the_kernel_and_python_of_its_release():
    assert os.uname().release.startswith(KERNELS[release()]), (release(), os.uname().release)
    assert sys.version_info[:2] == PYTHONS[release()]
    assert os.path.isfile(f"/usr/lib/modules/{os.uname().release}/modules.dep")


def test_an_802_1ad_vlan_aware_bridge_and_an_active_backup_bond():
    with IPRoute() as ipr:
        ipr.link("add", ifname="kvbr", kind="bridge", br_vlan_filtering=1, br_vlan_protocol=ETH_P_8021AD)
        ipr.link("add", ifname="kvbond", kind="bond", bond_mode=1)
        ipr.link("add", ifname="kvslave", kind="dummy")
        bridge, bond, slave = (ipr.link_lookup(ifname=name)[0] for name in ("kvbr", "kvbond", "kvslave"))
        ipr.link("set", index=slave, master=bond)
        ipr.link("set", index=bond, master=bridge)
        data = dict(ipr.get_links(bridge)[0].get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")["attrs"])
        assert (data["IFLA_BR_VLAN_FILTERING"], data["IFLA_BR_VLAN_PROTOCOL"]) == (1, ETH_P_8021AD)
        assert ipr.get_links(slave)[0].get_attr("IFLA_MASTER") == bond
        assert ipr.get_links(bond)[0].get_attr("IFLA_MASTER") == bridge
