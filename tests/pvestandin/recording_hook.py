"""A test hookscript that records how it was called and can be told to fail.

Each call appends one JSON line to the record file: phase, argv, stdin, cwd, the node it
ran on, LC_ALL and PVE_MIGRATED_FROM (None when unset), every node's copy of the VM
config at that moment, whether the VM config lock was held, and on which nodes. A file
`fail-<phase>` in the control folder makes that phase exit 1; `print-<phase>` is printed
to stdout.
"""

from __future__ import annotations

import json
from pathlib import Path

_TEMPLATE = '''#!/usr/bin/python3
import fcntl, json, os, sys
from pathlib import Path

RECORD = {record!r}
CONTROL = Path({control!r})
script, vmid, phase = sys.argv[0], sys.argv[1], sys.argv[2]
root = Path(script).resolve().parents[4]  # <root>/var/lib/vz/snippets/<script>
def held(path):
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
lock_held = held(root / "var/lock/qemu-server" / f"lock-{{vmid}}.conf")
locks_held = sorted(p.parents[3].name for p in root.parent.glob(f"*/var/lock/qemu-server/lock-{{vmid}}.conf") if held(p))
confs = {{p.parts[-3]: p.read_text() for p in (root / "etc/pve/nodes").glob(f"*/qemu-server/{{vmid}}.conf")}}
entry = {{
    "phase": phase, "argv": sys.argv, "stdin": sys.stdin.read(), "cwd": os.getcwd(), "node": root.name,
    "LC_ALL": os.environ.get("LC_ALL"), "PVE_MIGRATED_FROM": os.environ.get("PVE_MIGRATED_FROM"),
    "confs": confs, "lock_held": lock_held, "locks_held": locks_held,
}}
with open(RECORD, "a") as out:
    out.write(json.dumps(entry) + "\\n")
print(f"hook {{phase}} ran on {{root.name}}")
extra = CONTROL / f"print-{{phase}}"
if extra.exists():
    print(extra.read_text(), end="")
if (CONTROL / f"fail-{{phase}}").exists():
    print(f"hook: failing {{phase}} as told", file=sys.stderr)
    sys.exit(1)
'''


class RecordingHook:
    def __init__(self, folder: Path):
        self.folder = folder
        self.record = folder / "calls.jsonl"
        self.control = folder / "control"
        self.control.mkdir(parents=True, exist_ok=True)
        self.script = folder / "recorder.py"
        self.script.write_text(_TEMPLATE.format(record=str(self.record), control=str(self.control)))
        self.script.chmod(0o755)

    def calls(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def phases(self) -> list[str]:
        return [call["phase"] for call in self.calls()]

    def fail(self, phase: str) -> None:
        (self.control / f"fail-{phase}").touch()

    def say(self, phase: str, text: str) -> None:
        (self.control / f"print-{phase}").write_text(text)
