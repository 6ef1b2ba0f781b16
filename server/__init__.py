"""The coordinator: provisioning, the ServerApp, aggregation, reporting.

Uses ``fedrad.common``; never imports ``fedrad.client`` (the ClientApp is loaded by Flower from
its reference string).
"""
