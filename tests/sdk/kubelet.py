"""Writes a directory the way kubelet's AtomicWriter updates a ConfigMap/Secret volume.

Layout: `..<timestamp>/` holds the files, `..data` is a symlink to it, and each visible
`<name>` is a symlink to `..data/<name>`. An update writes a new timestamped directory, points
a temporary symlink at it, renames that over `..data` (one atomic step), then removes the old
directory.
"""

import os
import pathlib
import shutil
import time


def write(dir_path, files):
    """Atomically replaces the projected contents of `dir_path` with `files` (name -> text)."""
    d = pathlib.Path(dir_path)
    d.mkdir(parents=True, exist_ok=True)
    stamp = d / (time.strftime("..%Y_%m_%d_%H_%M_%S.") + str(time.monotonic_ns()))
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
    data = d / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    tmp = d / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(stamp.name, tmp)
    os.rename(tmp, data)
    for name in files:
        link = d / name
        if not link.is_symlink():
            if link.exists():
                link.unlink()
            os.symlink(f"..data/{name}", link)
    for entry in d.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()
    if old:
        shutil.rmtree(d / old, ignore_errors=True)
