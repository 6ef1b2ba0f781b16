"""Code shared by the coordinator (``fedrad.server``) and the hospital node (``fedrad.client``).

Nothing in here imports from ``fedrad.server`` or ``fedrad.client``.
"""
