#!/usr/bin/env python
"""Round-trip notebooks through jupytext percent scripts, the way STYLE.md advises.

    python tools/nbpy.py py nbs/00_core.ipynb /tmp/00_core.py   # notebook -> editable script
    python tools/nbpy.py nb /tmp/00_core.py nbs/00_core.ipynb   # script -> notebook (the source we commit)

The .ipynb stays the source of truth; the script is a scratch copy for editing. `nb` drops jupytext's
metadata and sets the python3 kernelspec so `nbdev-clean` has nothing left to change.
"""
import sys, jupytext, nbformat

def to_py(nb, py): jupytext.write(jupytext.read(nb), py, fmt='py:percent')

def _old_ids(nb):
    "Cell ids of an existing notebook by source, so unchanged cells keep their id (and exports stay quiet)"
    try: old = nbformat.read(nb, as_version=4)
    except FileNotFoundError: return {}
    ids = {}
    for c in old.cells: ids.setdefault(c.source, []).append(c.id)
    return ids

def to_nb(py, nb):
    n,ids = jupytext.read(py, fmt='py:percent'),_old_ids(nb)
    n.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    for c in n.cells:
        c.metadata = {}
        if ids.get(c.source): c.id = ids[c.source].pop(0)
    nbformat.write(n, nb)

if __name__ == '__main__':
    cmd, src, dst = sys.argv[1:4]
    {'py': to_py, 'nb': to_nb}[cmd](src, dst)
