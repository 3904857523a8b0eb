"""Shared pytest setup. Fixtures that start real components live in tests/fixtures/."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Tests import the checkout's package, never an installed copy.
sys.path.insert(0, str(REPO))

pytest_plugins: list[str] = []

# Real Proxmox configs and command lines (../shared/peer beside the checkout, in CI too).
PEER = REPO.parent / "shared" / "peer"
pytest_plugins.append("fixtures.pveroot")

# Real QEMU (Proxmox-like command lines, QMP) for the args tests.
pytest_plugins += ["fixtures.qemu"]

pytest_plugins.append("fixtures.ovs")
pytest_plugins += ["fixtures.journald"]
pytest_plugins.append("fixtures.debian_chroot")

# A real guest (Debian kernel + busybox initramfs) for the data-path tests.
pytest_plugins.append("fixtures.guest")

# Real-kernel test files (pytestmark = pytest.mark.real_kernel) run inside a QEMU guest
# booting Debian's kernel; each of their tests is reported here (fixtures/kernelvm.py).
pytest_plugins.append("fixtures.kernelvm")
