"""Drop-in interfaces of the systems medinfer replaces (thin adapters over the core).

- :mod:`medinfer.compat.pivot`: the PIVOT lung-nodule detection inference guide
  (``docs/compat/pivot.md``).

Nothing here re-implements a step: each call converts the described arguments and
returns the described shapes around the one implementation in the core layers.
"""
