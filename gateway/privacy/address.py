"""Street addresses as whole blocks: a street line, then the unit, locality, region, postcode and
country that follow it.

spaCy's small model has no street-address label, and a redactor that hides "12 Main Street"
but leaves "Apt. 4, Springfield, IL 62704" in clear has not hidden the address. So we find an
anchor with a distinctive shape (a house number next to a street name with a street type, a
continental "Name 12" street with a known street word, a PO box, a military address, a unit
line) and extend it over the address parts that follow it on the same or the next lines.

Everything here is shape and vocabulary (street types in several languages), no list of real
streets or towns: it generalises to addresses we have never seen, and costs ~1 ms per KB.
"""

from __future__ import annotations

import regex

from gateway.privacy.places import COUNTRY_PATTERN

# A capitalised word in any script (Ø, Ποσειδώνος, São), possibly hyphenated or abbreviated.
_W = r"\p{Lu}[\p{L}\p{M}'’.\-]*"
# Lower-case particles inside street and place names (Rue de Bouillon, Treinta y Tres).
_LINK = (
    r"(?:de|del|della|da|do|dos|das|di|du|des|la|le|las|los|van|von|der|den|y|e|i|am|an|auf|im|al|el|sur|lès|"
    r"lez|t|u|nad|pod)"
)
_NAME = rf"{_W}(?:[ \t]+(?:{_LINK}[ \t]+)?{_W}){{0,4}}"
_NUM = r"\d{1,6}[A-Za-rt-z]?(?:[/-]\d{1,4}[A-Za-z]?)?"  # not "70s": a decade

# English street types (with their USPS abbreviations) that follow the street name.
_STREET_TYPES = (
    "Street|St|Avenue|Ave|Av|Road|Rd|Drive|Dr|Lane|Ln|Boulevard|Blvd|Way|Court|Ct|Place|Pl|Terrace|Ter|"
    "Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Crescent|Cres|Close|Row|Alley|Aly|Loop|Pike|"
    "Plaza|Gardens|Gdns|Grove|Gr|Hill|Mews|Walk|Green|Park|Ridge|View|Heights|Hts|Crossing|Xing|Expressway|"
    "Freeway|Fwy|Turnpike|Route|Rte|Path|Point|Pt|Harbor|Harbour|Hollow|Junction|Jct|Landing|Meadows?|"
    "Mills?|Springs?|Station|Sta|Summit|Valley|Vly|Villages?|Vlg|Wells?|Estates?|Fields?|Forest|Glen|Haven|"
    "Island|Isle|Lake|Manor|Orchard|Pass|Port|Radial|Ranch|Shores?|Squares?|Stream|Track|Trace|Underpass|"
    "Viaduct|Ville|Vista|Wharf|Quay|Parade|Esplanade|Promenade|Causeway|Rise|Chase|Gate|Wynd|Broadway|Ways?|"
    "Greens?|Brooks?|Bypass|Camp|Cape|Centre|Center|Corners?|Cove|Creek|Crest|Dale|Dam|Divide|Extension|"
    "Falls?|Ferry|Flats?|Ford|Fork|Fort|Gardens?|Lights?|Locks?|Mount|Mountain|Oval|Plains?|Ramp|Rest|Run|"
    "Shoal|Skyway|Spur|Terrace|Tunnel|Union|Knolls?|Keys?|Hills?|Heights|Cliffs?|Burgs?|Bluffs?|Bend|Beach|"
    "Bayou|Arcade|Anex|Overpass|Motorway|Lanes?"
)
_DIRECTION = r"(?:North|South|East|West|Northeast|Northwest|Southeast|Southwest|N|S|E|W|NE|NW|SE|SW)\.?"
# Street words that come before the name (Via Roma 12, Rue de la Paix, ul. Dmowskiego 5).
_STREET_PREFIXES = (
    r"Via|Viale|Vicolo|Piazza|Piazzale|Corso|Largo|Strada|Contrada|Località|Loc\.|Rua|R\.|Travessa|Tv\.|Praça|"
    r"Pç\.|Rúa|R|Avenida|Av\.|Avda\.?|Alameda|Estrada|Bairro|Calle|C/|Carrer|Carretera|Ctra\.|Camino|Paseo|Pº|"
    r"Plaza|Pza\.|Rambla|Ronda|Travesía|Rue|Avenue|Boulevard|Bd|Bvd|Chemin|Allée|Impasse|Quai|Route|Place|"
    r"Cours|Ulica|ul\.|Aleja|al\.|Ulitsa|ul|Odos|Leoforos|Leof\.|Strasse|Straße|Calea|Strada|Bulevardul|Bd\.|"
    r"Stradă|Ulice|Ul\.|Sokak|Sok\.|Cadde|Cad\.|Mahallesi|Mah\.|Οδός|οδός|Οδ\.|Λεωφόρος|Λεωφ\.|Λ\.|Πλατεία|πλατεία"
)
# Street words that end the name, as a word of their own or glued to it (Olmstraat, Skolevei).
_STREET_SUFFIXES = (
    r"laan|vej|veg|vei|veien|vegen|gade|gate|gata|gatan|gasse|väg|vägen|straße|strasse|str\.|weg|platz|plein|"
    r"straat|gracht|kade|singel|tie|katu|kuja|polku|aukio|utca|út|tér|körút|ring|allee|damm|ufer|chaussee|"
    r"terrasse|stræde|plass|plads|torget|torg|ulica|ulice|cesta|iela|gatve|hof|dreef|steeg|markt|stieg|"
    r"gränd|põik|tänav|mnt|brekka|braut|stígur|stræti|gerði|vegur|götu|gata|sund|bakke|toft|park|stig|"
    r"hraun|holt|tún|vellir|gil|Aqq\.|Aqqut|Qeqqa|Qeppa|u\.|g\."
)
_UNIT = (
    r"(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl|Room|Rm|Building|Bldg|Block|Blk|Lot|Dept|Office)\.?"
    r"[ \t]*#?[ \t]*\d{1,5}[A-Za-z]?|#[ \t]*\d{1,5}[A-Za-z]?"
)
_PO_BOX = r"(?:P\.?[ \t]?O\.?[ \t]?Box|Post Office Box|Postfach|Apartado|Caixa Postal|Boîte Postale|BP)[ \t]+\d{1,6}"
_MILITARY = (
    r"(?:(?:PSC|CMR|Unit)[ \t]+\d{3,5},?[ \t]+Box[ \t]+\d{3,5}|(?:USS|USNS|USNV|USCGC)[ \t]+\p{Lu}[\p{L}'-]+)"
    r"(?:[ \t]*\n?[ \t]*(?:APO|FPO|DPO)[ \t]+(?:AA|AE|AP)[ \t]+\d{5})?"
    r"|(?:APO|FPO|DPO)[ \t]+(?:AA|AE|AP)[ \t]+\d{5}"
)
# Postcodes: US ZIP(+4), 4-6 digits, PL 00-000, PT 0000-000, NL 1234 AB, UK, Canada.
_POSTCODE = (
    r"(?:\d{5}-\d{4}|\d{4}-\d{3}|\d{2}-\d{3}|\d{3}[ ]\d{2}|\d{4}[ ]?\p{Lu}{2}|\d{4,6}"
    r"|\p{Lu}{1,2}\d[\p{Lu}\d]?[ ]?\d\p{Lu}{2}|\p{Lu}\d\p{Lu}[ ]?\d\p{Lu}\d)(?![\d-]|[ \t]\d)"
)
# Cues that announce an address without a street word (on Midhraun 10, address: Πεντέλης 210).
_CUE = (
    r"(?i:address(?:es)?(?:[ \t]+is)?[ \t]*:?|lives?[ \t]+(?:on|at)|lived[ \t]+(?:on|at)|living[ \t]+(?:on|at)|"
    r"located[ \t]+(?:on|at)|is[ \t]+on|side[ \t]+of|corner[ \t]+of|moved[ \t]+to|ship(?:ped)?[ \t]+to|"
    r"deliver(?:ed)?[ \t]+to|send[ \t]+(?:it|them|this)?[ \t]*to|sent[ \t]+to|mail(?:ed)?[ \t]+to|stop[ \t]+at|off[ \t]+at|"
    r"meet(?:[ \t]+(?:me|you|us))?[ \t]+at|taxi[ \t]+to)"
)

_MONTHS = (
    r"(?:Jan|January|Feb|February|Mar|March|Apr|April|May|Jun|June|Jul|July|Aug|August|Sep|Sept|September|"
    r"Oct|October|Nov|November|Dec|December|Mon|Monday|Tue|Tuesday|Wed|Wednesday|Thu|Thursday|Fri|Friday|"
    r"Sat|Saturday|Sun|Sunday)\b"
)
# Capitalised counters in running text ("300 Units 2021", "100 Points 3").
_COMMON_NOUNS = (
    r"(?:Units?|Points?|Pages?|Items?|Rows?|Columns?|Lines?|Chapters?|Sections?|Tables?|Figures?|Versions?|"
    r"Steps?|Levels?|Players?|Users?|People|Days?|Years?|Hours?|Minutes?|Dollars?|Euros?|Million|Billion|"
    r"Thousand|Hundred|Percent|Times?|Miles?|Km|Kg|GB|MB|TB|Channel|Floor|Gate|Platform|Track|Stage|Phase|"
    r"Round|Episode|Season|Volume|Vol|Part|Page|No|Number|Room|Level)\b"
)

_ANCHORS: tuple[tuple[regex.Pattern[str], float], ...] = (
    # 12 Main Street, 744 15 Millicent Drive, 4018 N. Oak Ridge Rd, 184 Arnott Heights East
    (
        regex.compile(
            rf"\b\d{{1,6}}[A-Za-z]?(?:[ \t]+\d{{1,6}}[A-Za-z]?)?[ \t]+(?:{_DIRECTION}[ \t]+)?"
            rf"{_NAME}[ \t]+(?:{_STREET_TYPES})\b\.?(?:[ \t]+{_DIRECTION}(?![\p{{L}}]))?"
        ),
        0.9,
    ),
    # Via Pasquale Scura 127, 893 Via Leopardi 83, ul. Asnyka Adama 82, Rue de Bouillon 178
    (
        regex.compile(
            rf"(?<![\p{{L}}\d])(?:\d{{1,6}}[ \t]+){{0,2}}(?:{_STREET_PREFIXES})[ \t]+(?:{_LINK}[ \t]+){{0,2}}{_NAME},?"
            rf"[ \t]+{_NUM}\b"
        ),
        0.9,
    ),
    # 23 Rue Abderrahmen Ziad, 46 rue Nationale (number first, no number after)
    (
        regex.compile(
            rf"\b(?:\d{{1,6}}[ \t]+)?\d{{1,5}},?[ \t]+(?:{_STREET_PREFIXES}|(?i:rue|avenue|boulevard|chemin|place|allée|impasse|quai))"
            rf"[ \t]+(?:{_LINK}[ \t]+){{0,2}}{_NAME}"
        ),
        0.85,
    ),
    # Olmstraat 69, 64842 Hauger Skolevei 90, Langenhorner Chaussee 76, Kase põik 91, Tas vezér u. 66
    (
        regex.compile(
            # (the street word is matched whole, then a number after it and only then its ending
            # checked: a lazy prefix tried against every suffix cost 2 ms per KB)
            rf"(?<![\p{{L}}\d])(?:\d{{1,6}}[ \t]+){{0,2}}(?:{_NAME}[ \t]+)?[\p{{L}}\p{{M}}'-]+\.?"
            rf"(?=[ \t]+\d)(?<=(?i:{_STREET_SUFFIXES}))[ \t]+{_NUM}\b"
        ),
        0.85,
    ),
    # 637 Strojírenská 1006, 449 Πεντέλης 210: a building number before a "Name 12" street
    # (3+ digits first: "2 Release 3", "42 Column 7" are not addresses; nor are dates)
    (regex.compile(rf"\b\d{{3,6}}[ \t]+(?!{_MONTHS})(?!{_COMMON_NOUNS}){_NAME}[ \t]+{_NUM}\b(?![.,]\d)"), 0.7),
    # 4093 110 Kontomari: a building number, then a street that starts with its own number
    (regex.compile(rf"\b\d{{1,6}}[ \t]+\d{{1,5}}[A-Za-z]?[ \t]+{_NAME}(?=[ \t]*(?:$|[,\n]))"), 0.7),
    # lives on Amelia Center Street (no number)
    (regex.compile(rf"(?<={_CUE}[ \t]+){_NAME}[ \t]+(?:{_STREET_TYPES})\b"), 0.6),
    # on Midhraun 10, address: Helmstok 174
    (regex.compile(rf"(?<={_CUE}[ \t]+)(?!{_MONTHS}|{_COMMON_NOUNS}){_NAME}[ \t]+{_NUM}\b(?![.,:]\d)"), 0.6),
    (regex.compile(rf"\b{_PO_BOX}\b"), 0.85),
    (regex.compile(rf"\b(?:{_MILITARY})\b"), 0.9),
    # Apt. 559, Suite 026 alone; "Block 5", "Room 101", "issue #42" only inside an address
    (regex.compile(r"\b(?:Apt|Apartment|Suite|Ste|Unit|Flat)\.?[ \t]*#?[ \t]*\d{1,5}[A-Za-z]?\b"), 0.5),
    # a postcode closing a letter's address ("Finland 45622" on its own line)
    (regex.compile(rf"(?m)(?<=^[^\n\d]{{0,8}}{_NAME}[ \t]+){_POSTCODE}(?=[ \t]*$)"), 0.5),
    # the corner of Main Street and 5th Avenue
    (regex.compile(rf"(?<=(?i:corner[ \t]+of)[ \t]+){_NAME}(?:[ \t]+{_NUM})?[ \t]+and[ \t]+{_NAME}(?:[ \t]+{_NUM})?"), 0.7),
)

_SEP = r"(?:[ \t]*,[ \t]*|[ \t]*\n[ \t]*(?:,[ \t]*)?|[ \t]+)"
# What may follow an anchor and still belong to the address. A place name must be followed by
# something an address can continue or end with, not e.g. "Mobile:" on a business card.
_TAIL_PART = regex.compile(
    rf"{_SEP}(?:(?P<unit>{_UNIT}|{_PO_BOX})\b|(?P<country>{COUNTRY_PATTERN})(?![\p{{L}}])"
    rf"|(?P<zip>{_POSTCODE})|(?P<state>\p{{Lu}}{{2}})(?![\p{{L}}\d])"
    rf"|(?P<place>{_NAME})(?=[ \t]*(?:$|[,\n.?!;)]|[ \t]\d|[ \t]\p{{Lu}})))",
)
_MAX_TAIL = 7


def _tail_end(text: str, pos: int) -> tuple[int, int]:
    """End of the address parts following `pos`, and how many there were."""
    parts = 0
    while parts < _MAX_TAIL:
        m = _TAIL_PART.match(text, pos)
        if not m:
            break
        if text[pos - 1] == "." and not text[pos:m.start(m.lastgroup)].strip(" \t"):
            break  # "10 Downing Street. John Smith will...": a full stop then a space ends the address
        pos = m.end()
        parts += 1
        if m.lastgroup in ("zip", "country") and not _TAIL_PART.match(text, pos):
            break
        if m.lastgroup == "zip":
            # A postcode ends an address ("Belgium 34866\n0494 41 18 24" is a phone after it),
            # unless the town follows it on the same line ("00184 Roma, Italia").
            nxt = _TAIL_PART.match(text, pos)
            if not nxt or "\n" in text[pos : nxt.start(nxt.lastgroup)] or nxt.lastgroup not in ("place", "country"):
                break
    return pos, parts


def find_addresses(text: str) -> list[tuple[int, int, float]]:
    """(start, end, score) of address blocks, overlapping anchors merged into one block."""
    found: list[tuple[int, int, float]] = []
    for pattern, score in _ANCHORS:
        for m in pattern.finditer(text):
            end, parts = _tail_end(text, m.end())
            # An anchor followed by address parts is an address whatever its own shape.
            found.append((m.start(), end, max(score, 0.9) if parts else score))
    found.sort()
    merged: list[list[float]] = []
    for start, end, score in found:
        if merged and start <= merged[-1][1]:
            last = merged[-1]
            last[1] = max(last[1], end)
            last[2] = max(last[2], score)
        else:
            merged.append([start, end, score])
    return [(int(a), int(b), s) for a, b, s in merged]
