"""Unit codes: the UN/ECE Recommendation 20 codes accepted without configuration, and the
Rec 21 package codes an earlier release took as units. Extra codes come from configuration
through the pydantic validation context (key `UOM_CODES_CONTEXT_KEY`), never from state kept at
package level.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = [
    "BUILTIN_UOM_CODES",
    "REC21_PACKAGE_CODES",
    "UOM_CODES_CONTEXT_KEY",
]


UOM_CODES_CONTEXT_KEY: Final = "uom_codes"
"""Validation-context key holding extra UN/ECE Rec 20 codes allowed beyond `BUILTIN_UOM_CODES`,
for example `Quantity.model_validate(raw, context={UOM_CODES_CONTEXT_KEY: {"KGS"}})`."""

BUILTIN_UOM_CODES: Final[frozenset[str]] = frozenset(
    {
        # counts and packaging
        "C62",  # one (unit)
        "H87",  # piece
        "EA",  # each
        "SET",  # set
        "PR",  # pair
        "DZN",  # dozen
        # packages: Rec 20 carries Rec 21's package codes with an X in front
        "XBX",  # box
        "XCT",  # carton
        "XCS",  # case
        "XPK",  # package
        "XBG",  # bag
        "XBO",  # bottle
        "XDR",  # drum
        "XPX",  # pallet
        "XRO",  # roll
        # mass
        "KGM",  # kilogram
        "GRM",  # gram
        "MGM",  # milligram
        "TNE",  # tonne
        "LBR",  # pound
        "ONZ",  # ounce (avoirdupois)
        # volume
        "LTR",  # litre
        "MLT",  # millilitre
        "HLT",  # hectolitre
        "MTQ",  # cubic metre
        "GLL",  # gallon (US)
        # length and area
        "MTR",  # metre
        "CMT",  # centimetre
        "MMT",  # millimetre
        "KMT",  # kilometre
        "INH",  # inch
        "FOT",  # foot
        "MTK",  # square metre
        # time
        "SEC",  # second
        "MIN",  # minute
        "HUR",  # hour
        "DAY",  # day
        # energy and power
        "KWH",  # kilowatt hour
        "WHR",  # watt hour
        "MWH",  # megawatt hour
        "KWT",  # kilowatt
        "WTT",  # watt
        # temperature
        "CEL",  # degree Celsius
        "FAH",  # degree Fahrenheit
        "KEL",  # kelvin
        # pressure, force, torque
        "BAR",  # bar
        "MBR",  # millibar
        "PAL",  # pascal
        "KPA",  # kilopascal
        "MPA",  # megapascal
        "NEW",  # newton
        "NU",  # newton metre
        # electrical, rotation, ratio
        "AMP",  # ampere
        "VLT",  # volt
        "HTZ",  # hertz
        "RPM",  # revolutions per minute
        "P1",  # percent
    }
)
"""UN/ECE Recommendation 20 common codes accepted without configuration."""

REC21_PACKAGE_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "BX": "XBX",
        "CT": "XCT",
        "CS": "XCS",
        "PK": "XPK",
        "BG": "XBG",
        "BO": "XBO",
        "DR": "XDR",
        "PF": "XPX",
        "RO": "XRO",
    }
)
"""Rec 21 package codes an earlier release took as units, and their Rec 20 codes. They are no
units of Rec 20: events never carry them; an old config is read with them replaced (and says
so), an MES message that sends one is refused with the Rec 20 code to use."""
