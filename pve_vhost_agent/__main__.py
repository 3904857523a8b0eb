"""`python3 -m pve_vhost_agent` runs the same CLI as the installed command."""

from pve_vhost_agent.cli.main import run

if __name__ == "__main__":
    run()
