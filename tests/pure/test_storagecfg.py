"""storage.cfg as pve-storage resolves a snippet folder: path + content-dirs, `local` always."""

import pytest

from pve_vhost_agent.formats.storagecfg import LOCAL, Storage, parse_storages

CFG = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup,snippets
\tcontent-dirs snippets=hooks/pve,iso=isos

nfs: shared
\tpath /mnt/pve/shared
\tserver 10.0.0.1
\texport /export
\tcontent snippets
\tcontent-dirs snippets=snips; backup=dumps

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images
"""


@pytest.mark.parametrize("name, folder", [("local", "/var/lib/vz/hooks/pve"), ("shared", "/mnt/pve/shared/snips")])
def test_content_dirs_move_the_snippets_folder(name, folder):
    storage = parse_storages(CFG)[name]
    assert f"{storage.path}/{storage.subdir('snippets')}" == folder


def test_without_content_dirs_snippets_is_the_folder_and_lvm_has_none():
    storages = parse_storages(CFG.replace("\tcontent-dirs snippets=hooks/pve,iso=isos\n", ""))
    assert storages["local"].subdir("snippets") == "snippets"
    assert storages["local-lvm"] == Storage("lvmthin", None, ())


@pytest.mark.parametrize("text", ["", "dir: local\n\tpath /srv/elsewhere\n\tcontent-dirs snippets=x\n",
                                  "nfs: local\n\tpath /var/lib/vz\n\tcontent-dirs snippets=x\n"])
def test_local_is_always_the_default_dir_when_storage_cfg_says_otherwise(text):
    # pve-storage's parse_config puts its default `local` in place of a missing or odd one.
    assert parse_storages(text)["local"] == LOCAL


def test_a_local_without_path_gets_the_default_path_and_keeps_its_content_dirs():
    local = parse_storages("dir: local\n\tcontent snippets\n\tcontent-dirs snippets=hooks\n")["local"]
    assert (local.path, local.subdir("snippets")) == ("/var/lib/vz", "hooks")
