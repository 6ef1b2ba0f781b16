"""DICOM attributes that identify people, studies or times, and so can never be labels.

A label becomes a class name: it is printed, written to the PHI-free reports and sent to the
coordinator as part of the study's class list. So ``label_attribute`` may not be an attribute
that identifies a patient or a staff member, or that links records: patient attributes,
names (VR PN), dates and times (DA, DT, TM), UIDs (UI), IDs and accession numbers,
institution, station, device serial numbers, addresses and phone numbers, following the
spirit of the DICOM PS3.15 basic de-identification profile. Binary and sequence attributes
are refused too (they are not class names).
"""

from __future__ import annotations

import re

from pydicom.datadict import dictionary_VR, tag_for_keyword

_IDENTIFYING_VRS = {"PN": "a person name", "DA": "a date", "DT": "a date-time", "TM": "a time", "UI": "a UID"}
_NOT_TEXT_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT", "UR"}
_IDENTIFYING_KEYWORD = re.compile(
    r"^(Patient|OtherPatient|Responsible|Issuer|Admitting|Admission|Military|Ethnic|Occupation|Religious|"
    r"Pregnancy|LastMenstrual|Medical(Alerts|Record)|CountryOfResidence|RegionOfResidence|Birth)"
    r"|Accession|Institution|Physician|Operator|Performing|Referring|Requesting|Scheduled|Station|Address|"
    r"Telephone|SerialNumber|Identifier|Verifying|Author|Person|Consult|Participant|ContentCreator|"
    r"Date|Time|UID|(ID|IDs|Name|Names|Number|Numbers)$"
)


def identifying_reason(keyword: str) -> str | None:
    """Why ``keyword`` cannot be a label attribute, or None when it may be one."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return f"unknown DICOM keyword {keyword!r}"
    vr = dictionary_VR(tag)
    for code, what in _IDENTIFYING_VRS.items():
        if code in vr.split(" or "):
            return f"{keyword} holds {what}, which identifies people or studies"
    if _IDENTIFYING_KEYWORD.search(keyword):
        return f"{keyword} may identify a patient, a person, an institution or a study"
    if set(vr.split(" or ")) & _NOT_TEXT_VRS:
        return f"{keyword} is a binary or sequence attribute (VR {vr}), not a class name"
    return None
