"""Place names the small NER model misses: a gazetteer of countries and US/Canadian/Australian
regions, and towns announced by a cue ("I'm in X", "moved here from X", "flew to X").

The gazetteer is deliberately small (sovereign states, common alternative names, first-level
regions of a few countries): these are the place names that appear alone in addresses and
sentences, and they are unambiguous enough to match without NER. Names that are also common
first names (Chad, Jordan, Georgia...) are left to NER, which sees their context.
"""

from __future__ import annotations

import regex

from gateway.privacy.not_personal import is_language_use

COUNTRIES = (
    "Afghanistan", "Albania", "Algeria", "Andorra", "Angola", "Antigua and Barbuda", "Argentina", "Armenia",
    "Australia", "Austria", "Azerbaijan", "Bahamas", "Bahrain", "Bangladesh", "Barbados", "Belarus", "Belgium",
    "Belize", "Benin", "Bhutan", "Bolivia", "Bosnia and Herzegovina", "Botswana", "Brazil", "Brunei", "Bulgaria",
    "Burkina Faso", "Burundi", "Cabo Verde", "Cape Verde", "Cambodia", "Cameroon", "Canada",
    "Central African Republic", "Chile", "China", "Colombia", "Comoros", "Congo", "Costa Rica",
    "Côte d'Ivoire", "Ivory Coast", "Croatia", "Cuba", "Cyprus", "Czech Republic", "Czechia", "Denmark",
    "Djibouti", "Dominica", "Dominican Republic", "East Timor", "Timor-Leste", "Ecuador", "Egypt", "El Salvador",
    "Equatorial Guinea", "Eritrea", "Estonia", "Eswatini", "Swaziland", "Ethiopia", "Fiji", "Finland", "France",
    "Gabon", "Gambia", "Germany", "Ghana", "Greece", "Greenland", "Grenada", "Guatemala", "Guinea",
    "Guinea-Bissau", "Guyana", "Haiti", "Honduras", "Hong Kong", "Hungary", "Iceland", "India", "Indonesia",
    "Iran", "Iraq", "Ireland", "Israel", "Italy", "Jamaica", "Japan", "Kazakhstan", "Kenya", "Kiribati",
    "Kosovo", "Kuwait", "Kyrgyzstan", "Laos", "Latvia", "Lebanon", "Lesotho", "Liberia", "Libya",
    "Liechtenstein", "Lithuania", "Luxembourg", "Macau", "Madagascar", "Malawi", "Malaysia", "Maldives", "Mali",
    "Malta", "Marshall Islands", "Mauritania", "Mauritius", "Mexico", "Micronesia", "Moldova", "Monaco",
    "Mongolia", "Montenegro", "Morocco", "Mozambique", "Myanmar", "Burma", "Namibia", "Nauru", "Nepal",
    "Netherlands", "The Netherlands", "Holland", "New Zealand", "Nicaragua", "Niger", "Nigeria", "North Korea",
    "North Macedonia", "Macedonia", "Norway", "Oman", "Pakistan", "Palau", "Palestine", "Panama",
    "Papua New Guinea", "Paraguay", "Peru", "Philippines", "Poland", "Portugal", "Puerto Rico", "Qatar",
    "Romania", "Russia", "Russian Federation", "Rwanda", "Saint Kitts and Nevis", "Saint Lucia", "Samoa",
    "San Marino", "Saudi Arabia", "Senegal", "Serbia", "Seychelles", "Sierra Leone", "Singapore", "Slovakia",
    "Slovenia", "Solomon Islands", "Somalia", "South Africa", "South Korea", "Korea", "South Sudan", "Spain",
    "Sri Lanka", "Sudan", "Suriname", "Sweden", "Switzerland", "Syria", "Taiwan", "Tajikistan", "Tanzania",
    "Thailand", "Togo", "Tonga", "Trinidad and Tobago", "Tunisia", "Turkey", "Türkiye", "Turkmenistan",
    "Tuvalu", "Uganda", "Ukraine", "United Arab Emirates", "UAE", "United Kingdom", "UK", "Great Britain",
    "Britain", "England", "Scotland", "Wales", "Northern Ireland", "United States", "United States of America",
    "USA", "U.S.A.", "Uruguay", "Uzbekistan", "Vanuatu", "Vatican City", "Venezuela", "Vietnam", "Viet Nam",
    "Yemen", "Zambia", "Zimbabwe", "Faroe Islands", "Åland", "Gibraltar", "Bermuda", "Guernsey", "Jersey",
    "Isle of Man", "Deutschland", "España", "Italia", "Österreich", "Schweiz", "Suisse", "Sverige", "Norge",
    "Danmark", "Suomi", "Polska", "Česko", "Magyarország", "Ελλάδα", "Κύπρος", "Ísland", "Brasil",
    "México", "Perú",
)
REGIONS = (
    # US states
    "Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut", "Delaware", "Florida",
    "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa", "Kansas", "Kentucky", "Louisiana", "Maine", "Maryland",
    "Massachusetts", "Michigan", "Minnesota", "Mississippi", "Missouri", "Montana", "Nebraska", "Nevada",
    "New Hampshire", "New Jersey", "New Mexico", "New York", "North Carolina", "North Dakota", "Ohio",
    "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island", "South Carolina", "South Dakota", "Tennessee",
    "Texas", "Utah", "Vermont", "Virginia", "Washington", "West Virginia", "Wisconsin", "Wyoming",
    # Canadian provinces, Australian states
    "Alberta", "British Columbia", "Manitoba", "New Brunswick", "Newfoundland", "Nova Scotia", "Ontario",
    "Prince Edward Island", "Quebec", "Québec", "Saskatchewan", "Yukon", "New South Wales", "Queensland",
    "South Australia", "Tasmania", "Western Australia", "Northern Territory",
    # Capitals and large cities often written alone
    "London", "Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Dublin", "Amsterdam", "Brussels", "Vienna",
    "Zurich", "Zürich", "Geneva", "Prague", "Warsaw", "Budapest", "Copenhagen", "Stockholm", "Oslo",
    "Helsinki", "Reykjavik", "Reykjavík", "Athens", "Istanbul", "Moscow", "Kyiv", "Kiev", "Tokyo", "Beijing",
    "Shanghai", "Seoul", "Mumbai", "Delhi", "New Delhi", "Bangalore", "Sydney", "Melbourne", "Brisbane",
    "Perth", "Auckland", "Wellington", "Toronto", "Montreal", "Vancouver", "Chicago", "Los Angeles",
    "San Francisco", "Boston", "Seattle", "Houston", "Dallas", "Miami", "Atlanta", "Philadelphia", "Denver",
    "Mexico City", "São Paulo", "Sao Paulo", "Rio de Janeiro", "Buenos Aires", "Santiago", "Lima", "Bogotá",
    "Cairo", "Lagos", "Nairobi", "Johannesburg", "Cape Town", "Dubai", "Tel Aviv", "Jerusalem", "Singapore",
    "Bangkok", "Jakarta", "Manila", "Hamburg", "Munich", "München", "Frankfurt", "Cologne", "Köln", "Milan",
    "Milano", "Naples", "Barcelona", "Valencia", "Seville", "Porto", "Lyon", "Marseille", "Rotterdam",
    "Antwerp", "Gothenburg", "Göteborg", "Kraków", "Krakow", "Wrocław", "Bucharest", "Sofia", "Belgrade",
    "Zagreb", "Ljubljana", "Bratislava", "Tallinn", "Riga", "Vilnius", "Edinburgh", "Glasgow", "Manchester",
    "Birmingham", "Liverpool", "Montevideo",
)


def _alternation(names: tuple[str, ...]) -> str:
    # Longest first, so "United States of America" wins over "United States".
    return "|".join(regex.escape(n) for n in sorted(set(names), key=len, reverse=True))


# A word as the phrase index sees it: letters, with inner apostrophes, dots or hyphens (U.S.A.,
# d'Ivoire, Guinea-Bissau).
_WORD = regex.compile(r"[\p{L}\p{M}]+(?:['’.-][\p{L}\p{M}]+)*\.?")


class PhraseIndex:
    """Exact phrases (1-4 words, single spaces) found by set lookups over the text's words.

    One big regex alternation of ~700 names costs 0.5-1.5 ms per KB with `regex`; walking the
    ~200 words of a KB and probing a set costs ~0.1 ms.
    """

    def __init__(self, phrases: set[str]) -> None:
        self._phrases = frozenset(phrases)
        self._max_words = max(p.count(" ") + 1 for p in phrases)
        # Phrases are only tried where a word could start one: a set probe per word instead of
        # four slices per word (half of this function's time on a 1 KB prompt).
        self._firsts = frozenset(p.split(" ", 1)[0] for p in phrases)

    def find(self, text: str) -> list[tuple[int, int]]:
        words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        firsts = self._firsts
        out: list[tuple[int, int]] = []
        i = 0
        while i < len(words):
            first = text[words[i][0] : words[i][1]]
            if first not in firsts and not (first.endswith(".") and first[:-1] in firsts):
                i += 1
                continue
            for n in range(min(self._max_words, len(words) - i), 0, -1):
                start, end = words[i][0], words[i + n - 1][1]
                phrase = text[start:end]
                if phrase.endswith(".") and phrase not in self._phrases:
                    end -= 1  # a sentence's full stop, not part of the name
                    phrase = phrase[:-1]
                if phrase in self._phrases and (n == 1 or phrase.count(" ") == n - 1):
                    out.append((start, end))
                    i += n - 1
                    break
            i += 1
        return out


COUNTRY_PATTERN = rf"(?:{_alternation(COUNTRIES)}|{_alternation(tuple(c.upper() for c in COUNTRIES))})"
_PLACE_NAMES = COUNTRIES + REGIONS
_GAZETTEER = PhraseIndex({form for n in _PLACE_NAMES for form in (n, n.upper())})

_W = r"\p{Lu}[\p{L}\p{M}'’-]*"
_LINK = r"(?:de|del|da|do|dos|das|di|du|des|la|le|van|von|der|den|am|an|im|upon|on|sur|lès|lez|el|al)"
_PLACE = rf"{_W}(?:[ \t-]+(?:{_LINK}[ \t-]+)?{_W}){{0,3}}"
# A cue that puts a place right after it. Prepositions alone ("from X") are too weak: "from Mary".
_CUE = (
    r"(?i:(?:i'm|i am|we're|we are|currently|still|stuck|staying|stay|live|lives|lived|living|based|born|"
    r"raised|grew up|moved(?: here)?|moving|relocated|relocating|travell?ing|travell?ed|flew|fly|flying|"
    r"drove|driving|arrived|arriving|headed|heading|returned|returning|originally|come|comes|came|hail|"
    r"hails|trip|vacation|holiday|office|offices|headquartered|university|city|town|village|citizen|"
    r"resident|native)"
    r"[ \t]+(?:back[ \t]+)?(?:in|from|to|at|of|near|into))"
)
# A cue ending right where an entity starts: the entity is a place whatever NER called it.
PLACE_CUE_BEFORE = regex.compile(rf"{_CUE}[ \t]+(?:the[ \t]+)?$")
_CUED_PLACE = regex.compile(rf"(?<={_CUE}[ \t]+)(?:the[ \t]+)?({_PLACE})(?![\p{{L}}\d])")
# Words a cue may be followed by that are not places.
_NOT_PLACES = frozenset(
    {
        "The", "A", "An", "My", "Your", "His", "Her", "Our", "Their", "This", "That", "These", "Those",
        "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
        "November", "December", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
        "I", "It", "We", "You", "He", "She", "They", "Mr", "Mrs", "Ms", "Dr", "Prof",
    }
)


def find_places(text: str) -> list[tuple[int, int, float]]:
    """(start, end, score) of gazetteer places (0.9) and cue-announced places (0.7)."""
    out = [(a, b, 0.9) for a, b in _GAZETTEER.find(text)]
    for m in _CUED_PLACE.finditer(text):
        words = m.group(1).split()
        if words[0] in _NOT_PLACES:
            continue
        out.append((m.start(1), m.end(1), 0.7))
    return out


_KNOWN = frozenset(n.casefold() for n in _PLACE_NAMES)


def is_known_place(text: str) -> bool:
    """Whether `text` is a gazetteer place (any case)."""
    return text.strip().casefold() in _KNOWN


# Nationalities and peoples (NRP): the adjective or noun, singular and plural ("Norwegian(s)").
DEMONYMS = (
    "Afghan", "Albanian", "Algerian", "American", "Andorran", "Angolan", "Argentine", "Argentinian", "Armenian",
    "Australian", "Austrian", "Azerbaijani", "Bahraini", "Bangladeshi", "Belarusian", "Belgian", "Bolivian",
    "Bosnian", "Brazilian", "British", "Bulgarian", "Burmese", "Cambodian", "Cameroonian", "Canadian",
    "Chilean", "Chinese", "Colombian", "Congolese", "Croatian", "Cuban", "Cypriot", "Czech", "Danish", "Dane",
    "Dutch", "Ecuadorian", "Egyptian", "English", "Eritrean", "Estonian", "Ethiopian", "Faroese", "Filipino",
    "Finnish", "Finn", "French", "Georgian", "German", "Ghanaian", "Greek", "Greenlandic", "Greenlander",
    "Guatemalan", "Haitian", "Honduran", "Hungarian", "Icelandic", "Icelander", "Indian", "Indonesian",
    "Iranian", "Iraqi", "Irish", "Israeli", "Italian", "Jamaican", "Japanese", "Jordanian", "Kazakh",
    "Kenyan", "Korean", "Kosovar", "Kurdish", "Kuwaiti", "Kyrgyz", "Lao", "Latvian", "Lebanese", "Liberian",
    "Libyan", "Lithuanian", "Luxembourgish", "Macedonian", "Malagasy", "Malaysian", "Maltese", "Mexican",
    "Moldovan", "Mongolian", "Montenegrin", "Moroccan", "Mozambican", "Namibian", "Nepalese", "Nepali",
    "New Zealander", "Nicaraguan", "Nigerian", "Nigerien", "Norwegian", "Omani", "Pakistani", "Palestinian",
    "Panamanian", "Paraguayan", "Peruvian", "Polish", "Pole", "Portuguese", "Qatari", "Romanian", "Russian",
    "Rwandan", "Salvadoran", "Saudi", "Scottish", "Scot", "Senegalese", "Serbian", "Singaporean", "Slovak",
    "Slovakian", "Slovenian", "Slovene", "Somali", "South African", "Spanish", "Spaniard", "Sri Lankan",
    "Sudanese", "Swedish", "Swede", "Swiss", "Syrian", "Taiwanese", "Tajik", "Tanzanian", "Thai", "Tibetan",
    "Tunisian", "Turkish", "Turk", "Turkmen", "Ugandan", "Ukrainian", "Uruguayan", "Uzbek", "Venezuelan",
    "Vietnamese", "Welsh", "Yemeni", "Zairean", "Zambian", "Zimbabwean", "Chechen", "Basque", "Catalan",
    "Flemish", "Walloon", "Sami", "Inuit", "Maori", "Māori", "Roma", "Latino", "Latina", "Hispanic",
    "Arab", "Persian", "Punjabi", "Bengali", "Tamil", "Sikh", "Hindu", "Muslim", "Jewish", "Jew",
)


def _plural(word: str) -> str:
    if word.endswith(("ese", "ish", "ch", "sh", "ss", "Swiss", "Inuit", "Sami")):
        return word
    return word + "s"


_DEMONYM_FORMS = {form for d in DEMONYMS for form in (d, _plural(d))}
_NATIONALITY = PhraseIndex(
    _DEMONYM_FORMS
    | {f.upper() for f in _DEMONYM_FORMS}
    # lower-case only in the plural: "latvians" is a people, "french" may be fries
    | {_plural(d).lower() for d in DEMONYMS if _plural(d) != d}
)


def find_nationalities(text: str) -> list[tuple[int, int, float]]:
    """(start, end, score) of nationality and people names, not languages named as such."""
    return [(a, b, 0.85) for a, b in _NATIONALITY.find(text) if not is_language_use(text, a, b)]
