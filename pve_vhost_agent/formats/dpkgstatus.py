"""dpkg's status file (/var/lib/dpkg/status): which packages are installed. Pure.

Each paragraph has `Package:` and `Status: <want> <flag> <status>`; a package counts as
installed when its status is `installed` (`install ok installed`, `hold ok installed`).
"""

from __future__ import annotations


def installed_packages(text: str) -> frozenset[str]:
    installed = set()
    for paragraph in text.split("\n\n"):
        name = status = ""
        for line in paragraph.splitlines():
            if line.startswith("Package:"):
                name = line[8:].strip()
            elif line.startswith("Status:"):
                words = line[7:].split()
                status = words[-1] if words else ""
        if name and status == "installed":
            installed.add(name)
    return frozenset(installed)
