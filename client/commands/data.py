"""``fedrad-node data index|preview|convert``: the site's DICOM archive (see fedrad.client.dicom)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from fedrad.client.dicom.cli import add_data_commands

    add_data_commands(sub)
