"""What identifies a file's version for the watchers (config reload, TLS and secret files).

Stat is taken through symlinks: Kubernetes updates a mounted ConfigMap or Secret by swapping
a `..data` symlink, so a new version shows as a new inode, whatever its mtime.
"""

from __future__ import annotations

import os

#: (device, inode, mtime in ns, size); None while the file cannot be read
StatKey = tuple[int, int, int, int] | None


def stat_key(path: str) -> StatKey:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
