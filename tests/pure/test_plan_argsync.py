"""Where args are written, and that a write always brings them in step (pure, by example)."""

from pve_vhost_agent.plan.args import ArgsPlan
from pve_vhost_agent.plan.argsync import sync_args
from pve_vhost_agent.formats.vmconfig import VmConfig

OWNED = ("-object", "memory-backend-memfd,id=vhu-mem,size=128M,share=on", "-machine", "memory-backend=vhu-mem")
OLD = " ".join(OWNED).replace("128M", "64M")
PLAN = ArgsPlan(OWNED)


def settle(config: VmConfig, running: bool) -> VmConfig:
    """Write as `apply` does until nothing changes (at most twice: it must settle at once)."""
    first = sync_args(config, PLAN, running)
    second = sync_args(first.config_after, PLAN, running)
    assert second.in_sync and second.config_after.text == first.config_after.text
    return first.config_after


def test_a_pending_delete_of_args_is_dropped_when_args_are_written():
    config = VmConfig.parse(f"args: {' '.join(OWNED)}\nmemory: 128\n\n[PENDING]\ndelete: args,numa\n")
    assert not sync_args(config, PLAN, running=False).in_sync
    after = settle(config, running=False)
    assert after.text == "args: -object memory-backend-memfd,id=vhu-mem,size=128M,share=on -machine memory-backend=vhu-mem" \
        "\nmemory: 128\n\n[PENDING]\ndelete: numa\n"
    stopped = settle(VmConfig.parse(f"args: {OLD}\nmemory: 128\n\n[PENDING]\ndelete: args\n"), running=False)
    assert stopped.text == f"args: {OLD}\nmemory: 128\n\n[PENDING]\nargs: {' '.join(OWNED)}\n"


def test_a_hibernated_vm_gets_its_args_as_a_pending_change():
    for mark in ("vmstate: local:vm-100-state.raw", "lock: suspended"):
        config = VmConfig.parse(f"args: {OLD}\n{mark}\nmemory: 128\n")
        after = settle(config, running=False)
        assert after.section()["args"] == OLD and after.section("pending")["args"] == " ".join(OWNED)


def test_a_running_vm_that_needs_no_args_gets_a_pending_delete():
    config = VmConfig.parse(f"args: {OLD}\nmemory: 128\n")
    after = sync_args(config, ArgsPlan(), running=True).config_after
    assert after.text == f"args: {OLD}\nmemory: 128\n\n[PENDING]\ndelete: args\n"
    assert sync_args(after, ArgsPlan(), running=True).in_sync
