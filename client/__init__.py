"""The hospital node: site data, DP-SGD training, the privacy ledger and the Flower ClientApp.

Uses ``fedrad.common``; never imports ``fedrad.server``.
"""
