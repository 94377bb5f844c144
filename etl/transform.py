"""Derive the output row from a validated reading: name split, timestamp, BP status, NEWS2."""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Final

import polars as pl

from contracts.models import OUTPUT_KEYS
from etl import rules

if TYPE_CHECKING:
    from collections.abc import Callable

#: Lower-case particles that belong to the upper-case family name after them
#: ("de GAULLE", "de los SANTOS", "bin ABDULLAH").
FAMILY_NAME_PARTICLES: Final = (
    "bin", "binti", "da", "das", "de", "del", "della", "den", "der", "des",
    "di", "do", "dos", "du", "la", "las", "le", "los", "ten", "ter", "van",
    "von", "zu",
)  # fmt: skip
#: Irish surname prefixes, which belong to the upper-case family name after
#: them too ("Seán Ó BRIAIN"): Ó and Ua (descendant of), Mac (son of), Ní and
#: Nic (daughter of), Uí and Mhic (wife of).
IRISH_SURNAME_PREFIXES: Final = ("Mac", "Mhic", "Ní", "Nic", "Ó", "Ua", "Uí")
#: Lower-case words that join two upper-case family names. "y" and "e" join
#: Spanish and Portuguese names ("ORTEGA y GASSET"). In French records,
#: "épouse" or "ép." (wife of) and "veuve" or "vve" (widow of) come before the
#: married name, and "née" (born) before the birth name ("DUBOIS épouse MARTIN").
FAMILY_NAME_CONNECTORS: Final = (
    "e", "y", "épouse", "Épouse", "ép.", "Ép.", "épse", "née", "Née", "veuve",
    "Veuve", "vve", "Vve",
)  # fmt: skip
_UPPER_CASE_WORD: Final = r"\p{Lu}[\p{Lu}\p{M}'\x{2019}\-]+"
_PARTICLES: Final = (*FAMILY_NAME_PARTICLES, *IRISH_SURNAME_PREFIXES)
_PARTICLE_RUN: Final = rf"(?:(?:{'|'.join(_PARTICLES)})\s+)"
#: The next upper-case word of a run, with an optional connector before it.
_CONNECTED_UPPER_CASE_WORD: Final = (
    rf"\s+(?:(?:{'|'.join(map(re.escape, FAMILY_NAME_CONNECTORS))})\s+)?"
    rf"{_UPPER_CASE_WORD}"
)
#: A part of a name in parentheses, such as a nickname ("Robert (Bob) Smith").
#: It stays with the word before it, or at the start with the word after it.
#: A parenthesis without its pair, or inside another pair, is an ordinary
#: character.
_PARENTHESISED: Final = r"\([^()]*\)"
#: A trailing run of upper-case words is the family name ("Marie Claire DUBOIS"),
#: the convention of French administrative records, with the lower-case
#: particles before it ("Charles de GAULLE") and the connectors within it.
#: Parenthesised parts after the run belong to it ("DUBOIS (Mimi)"). The
#: ``run`` group is the run without them, which is no family name when it is
#: a generational suffix or a credential alone ("John Smith III (Jack)").
UPPER_CASE_FAMILY_NAME: Final = (
    rf"^(?<first>.+?)\s+(?<last>(?<run>{_PARTICLE_RUN}*"
    rf"{_UPPER_CASE_WORD}"
    rf"(?:{_CONNECTED_UPPER_CASE_WORD})*)"
    rf"(?:\s{_PARENTHESISED})*)$"
)
#: Every name that matches :data:`UPPER_CASE_FAMILY_NAME` ends like this. The
#: test needs no capture groups, so it runs several times faster.
UPPER_CASE_LAST_WORD: Final = rf"\s{_UPPER_CASE_WORD}(?:\s{_PARENTHESISED})*$"
#: Generational suffixes, which end a family name ("John Smith III").
GENERATIONAL_SUFFIXES: Final = ("II", "III", "IV", "JR", "SR")
#: A leading run of upper-case words before a capitalised word is the family
#: name ("DUBOIS Marie Claire", "LE GALL Anne"), the order of French
#: administrative records, and so is one after particles ("de GAULLE Charles").
#: A run of one word without particles needs three letters, so that initials
#: stay a first name ("AJ Smith"). Parenthesised parts after the run belong
#: to it ("DUBOIS (MARTIN) Marie").
LEADING_UPPER_CASE_FAMILY_NAME: Final = (
    rf"^(?<last>(?:{_PARTICLE_RUN}+{_UPPER_CASE_WORD}(?:{_CONNECTED_UPPER_CASE_WORD})*"
    rf"|{_UPPER_CASE_WORD}(?:{_CONNECTED_UPPER_CASE_WORD})+"
    r"|\p{Lu}[\p{Lu}\p{M}'\x{2019}\-]{2,})"
    rf"(?:\s{_PARENTHESISED})*)\s+(?<first>\p{{Lu}}\p{{Ll}}.*?)"
    rf"(?:\s(?<suffix>{'|'.join(GENERATIONAL_SUFFIXES)}))?$"
)
#: Every name that matches :data:`LEADING_UPPER_CASE_FAMILY_NAME` starts like this.
LEADING_UPPER_CASE_WORD: Final = rf"^{_PARTICLE_RUN}*{_UPPER_CASE_WORD}\s"
#: A generational suffix in any case, with an optional full stop ("Jr.").
_ANY_CASE_SUFFIX: Final = rf"(?i:{'|'.join(GENERATIONAL_SUFFIXES)})\.?"
#: "FAMILY, Given" with one comma, the order of many admission exports
#: ("DUPONT, Jean", "Smith, John III"). A generational suffix after the given
#: names, after a space or a second comma, ends the family name ("Smith,
#: John, Jr.").
COMMA_SEPARATED_NAME: Final = (
    rf"^(?<last>[^,]+?)\s*,\s*(?<first>[^,\s][^,]*?)"
    rf"(?:[\s,]+(?<suffix>{_ANY_CASE_SUFFIX}))?$"
)
#: A generational suffix alone. After the comma, it is no given name, so the
#: name is not in "family, given" order ("Martin Luther King, Jr.").
SUFFIX_ONLY: Final = rf"^{_ANY_CASE_SUFFIX}$"
#: Post-nominal letters of degrees, fellowships and health and legal
#: professions, which may end a name after a comma or a space ("Jane Doe,
#: PhD", "John Smith MD"). They are matched as written here or in capitals,
#: with or without full stops ("M.D.", "Ph. D."). Letters that are also names
#: or initials are left out: DC, DO, MA, MS, OD and PA ("NGUYEN, Do", "MS
#: Dhoni"), and MBA, because Mba is also a family name.
CREDENTIALS: Final = (
    "APRN", "BSc", "BSN", "CNM", "CNS", "CRNA", "DDS", "DMD", "DNP", "DPM",
    "DPT", "DVM", "EdD", "Esq", "FAAP", "FACC", "FACEP", "FACP", "FACS", "FNP",
    "FRCP", "FRCS", "LPN", "MBBS", "MBChB", "MD", "MPH", "MRCP", "MSc", "MSN",
    "NP", "PharmD", "PhD", "PsyD", "RN", "RPh", "CCRN", "CNA", "FNP-BC", "JD",
    "LCSW", "PA-C", "RN-BC",
)  # fmt: skip
_CREDENTIAL: Final = "(?:{})".format(
    "|".join(
        r"(?:\.\s?)?".join(letters) + r"\.?"
        for letters in sorted({*CREDENTIALS, *(c.upper() for c in CREDENTIALS)})
    )
)
_CREDENTIAL_SEPARATOR: Final = r"(?:\s*,\s*|\s+)"
#: A run of upper-case words that ends a name without being a family name:
#: generational suffixes and credentials. Before a parenthesised part they
#: escape the credential rule, which reads the end of the name ("Jean Martin
#: MD FACS (Johnny)").
_NOT_A_FAMILY_NAME: Final = r"^(?:{words})(?:\s(?:{words}))*$".format(
    words="|".join(
        re.escape(word)
        for word in sorted(
            {
                *GENERATIONAL_SUFFIXES,
                *(credential.upper() for credential in CREDENTIALS),
            }
        )
    )
)
#: Every name that ends in credentials ends like this.
CREDENTIAL_AT_END: Final = rf"[\s,]{_CREDENTIAL}$"
#: A name of two words or more followed by credentials. Credentials are not
#: given names, so they stay after the family name ("Jane Doe, PhD" ->
#: "Jane" / "Doe, PhD").
NAME_WITH_CREDENTIALS: Final = rf"^(?<name>\S+\s.*?[^\s,])(?<credentials>(?:{_CREDENTIAL_SEPARATOR}{_CREDENTIAL})+)$"
#: Titles that may open a name ("Dr Jane Doe", "Mme Marie DUBOIS"): English,
#: French, Spanish and German forms of address, and the "Sister", "Brother"
#: and "Father" (Fr) of nurses and members of religious orders. "Don" is left
#: out because it is also a given name. They are matched as written
#: here, with or without a full stop, and in capitals ("MRS", "DR."). A title
#: of two letters in capitals needs its full stop, and so does "M", because
#: without one they may be initials ("MS Dhoni", "M Jean DUPONT").
TITLES: Final = (
    "Brother", "Dame", "Dr", "Father", "Fr", "Frau", "Herr", "Madame",
    "Mademoiselle", "Miss", "Mlle", "Mme", "Monsieur", "Mr", "Mrs", "Ms", "Mx",
    "Pr", "Prof", "Rev", "Señor", "Señora", "Señorita", "Sir", "Sister", "Sr",
    "Sra", "Srta", "Doña", "Dña",
)  # fmt: skip
#: Abbreviations of German doctoral degrees, which follow "Dr" ("Dr. med.",
#: "Dr. rer. nat.", "Dr. h.c."). They are matched as written here, always with
#: their full stops, and only after a title, so they never open a name.
DOCTORAL_DEGREES: Final = (
    "dent.", "h.c.", "iur.", "jur.", "med.", "nat.", "phil.", "pol.", "rer.",
    "theol.", "vet.",
)  # fmt: skip
# One optional full stop after the whole alternation keeps the automaton
# small. The capture groups of NAME_WITH_TITLE took about a third less CPU
# time than with one per title (Polars 2.1.0, 1M titled names, 2-vCPU AMD
# EPYC).
_TITLE: Final = r"(?:(?:{})\.?|(?:{})\.|M\.)".format(
    "|".join([*TITLES, *(title.upper() for title in TITLES if len(title) > 2)]),
    "|".join(title.upper() for title in TITLES if len(title) == 2),
)
#: One of :data:`DOCTORAL_DEGREES`, with an optional space after an inner
#: full stop ("h. c.").
_DEGREE: Final = "(?:{})".format(
    "|".join(
        r"\.\s?".join(degree.rstrip(".").split(".")) + r"\."
        for degree in DOCTORAL_DEGREES
    )
)
#: A title, then more titles or degrees ("Prof. Dr. med.").
_TITLE_RUN: Final = rf"{_TITLE}(?:\s(?:{_TITLE}|{_DEGREE}))*"
#: Every name that opens with a title opens like this.
TITLE_AT_START: Final = rf"^{_TITLE}\s"
#: Particles that are often capitalised in family names ("Van Dijk", "Le
#: Gall", "Du Plessis"). Those that are also common given or family names on
#: their own (Bin, Do, Der) are left out.
CAPITALISED_PARTICLES: Final = (
    "Da", "Das", "De", "Del", "Della", "Des", "Di", "Dos", "Du", "La", "Le",
    "Ten", "Ter", "Van", "Von",
)  # fmt: skip
#: A family name that is all that follows the titles: particles then an
#: upper-case run ("de GAULLE", "Ó BRIAIN"), lower-case particles then a
#: capitalised word, with no comma after ("van der Merwe"), or a capitalised
#: particle and one more word ("Van Dijk"). A leading family name before
#: given names ("de GAULLE Charles") does not match.
_FAMILY_NAME_ALONE: Final = (
    rf"{_PARTICLE_RUN}+{_UPPER_CASE_WORD}(?:{_CONNECTED_UPPER_CASE_WORD})*"
    rf"|(?:{'|'.join(FAMILY_NAME_PARTICLES)})\s+{_PARTICLE_RUN}*"
    r"[^\s,]*\p{Lu}[^\s,]*\p{Ll}[^,]*"
    rf"|(?:{'|'.join(CAPITALISED_PARTICLES)})\s[^\s,]+"
)
#: Titles, with any degrees among them, followed by a name of two words or
#: more ("Prof Dr Hans MÜLLER", "Dr. med. Anna Schmidt"). The ``title`` group
#: is set apart and put back before the first name, so the ``name`` group
#: splits as if the titles were not there ("Dr Jane Doe" -> "Dr Jane" /
#: "Doe", "Mme DUBOIS Marie" -> "Mme Marie" / "DUBOIS"). After a title and one
#: word, that word is the family name ("Mrs Smith" -> "Mrs" / "Smith"), as the
#: split by words already gives. Where the ``name`` group is a family name
#: alone, it is also the ``family`` group, and the titles are the whole first
#: name ("Mrs van der Merwe" -> "Mrs" / "van der Merwe").
NAME_WITH_TITLE: Final = (
    rf"^(?<title>{_TITLE_RUN})\s(?<name>(?<family>{_FAMILY_NAME_ALONE})|\S+\s.+)$"
)
#: An initial (one capital letter with an optional full stop) or a
#: parenthesised part, after the first word.
_MIDDLE_NAME: Final = rf"(?:\p{{Lu}}\.?|{_PARENTHESISED})"
#: A first word followed by initials or parenthesised parts, which are middle
#: names ("John A. Smith", "J. K. Rowling", "Robert (Bob) Smith"), or a first
#: word after parenthesised parts ("(Bob) Robert Smith").
#: NOTE: a one-word name with a parenthesised part ("Jean (Johnny)") does not
#: match, so the split by words makes the part the last name.
NAME_WITH_INITIALS: Final = (
    rf"^(?<first>(?:{_PARENTHESISED}\s)+[^\s,]+(?:\s{_MIDDLE_NAME})*"
    rf"|[^\s,]+(?:\s{_MIDDLE_NAME})+)\s(?<last>[^\s,].*)$"
)
#: Every name that matches :data:`NAME_WITH_INITIALS` starts like this.
INITIAL_AFTER_FIRST_WORD: Final = r"^(?:\(|[^\s,]+\s(?:\p{Lu}\.?\s|\())"
#: A combining mark, or a conjoining Hangul jamo (U+1100 to U+11FF, U+A960 to
#: U+A97F, U+D7B0 to U+D7FF): text with one may change under NFC.
DECOMPOSED: Final = r"[\p{M}\x{1100}-\x{11FF}\x{A960}-\x{A97F}\x{D7B0}-\x{D7FF}]"


def compose_marks(text: pl.Series) -> pl.Series:
    """Return ``text`` in Unicode Normalization Form C where it has a :data:`DECOMPOSED` character.

    A decomposed accent ("E" then U+0301) becomes the composed letter ("É"),
    and a run of conjoining jamo the Hangul syllable, so the patterns of the
    name split read both forms alike (NFC is defined in Unicode Standard
    Annex #15). Only non-ASCII values are searched, and only the matching
    ones are normalised, because normalising every name cost about 0.35
    CPU-s per million on a 2-vCPU AMD EPYC machine. Singletons that NFC
    maps to another character without any mark (U+212B ANGSTROM SIGN) are
    left as they are.
    """
    non_ascii = (text.str.len_bytes() != text.str.len_chars()).arg_true()
    if non_ascii.is_empty():
        return text
    marked = non_ascii.filter(text.gather(non_ascii).str.contains(DECOMPOSED))
    return _rewrite_rows(text, marked, lambda values: values.str.normalize("NFC"))


#: Characters stripped from both ends of a name before the split. No name
#: part is before a leading comma or after a trailing one, so the comma sets
#: no family name apart (", Jean" splits as "Jean"). Spaces are stripped too,
#: because the comma may have a space on its inner side.
EDGE_COMMA_CHARACTERS: Final = ", "


def strip_edge_commas(text: pl.Series) -> pl.Series:
    """Strip :data:`EDGE_COMMA_CHARACTERS` from the values that start or end with a comma.

    Stripping every name took about twice the CPU time of finding those
    values (Polars 2.1.0, 2-vCPU Intel Xeon).
    """
    edge_comma = (text.str.starts_with(",") | text.str.ends_with(",")).arg_true()
    return _rewrite_rows(
        text, edge_comma, lambda values: values.str.strip_chars(EDGE_COMMA_CHARACTERS)
    )


def _rewrite_rows(
    text: pl.Series, rows: pl.Series, rewrite: Callable[[pl.Series], pl.Series]
) -> pl.Series:
    """Return ``text`` with the values at the indexes ``rows`` passed through ``rewrite``."""
    if rows.is_empty():
        return text
    return text.clone().scatter(rows, rewrite(text.gather(rows)))


def collapse_whitespace(text: pl.Expr) -> pl.Expr:
    """Replace each run of whitespace by one space, with the regex run only where needed.

    A zero width space (U+200B) counts as whitespace, because it marks a word
    boundary without showing one. Left in, it would stick to a word of the
    first or last name.
    """
    irregular = pl.when(text.str.contains(r"\s\s|[^\S ]|\x{200B}")).then(text)
    collapsed = irregular.str.replace_all(r"[\s\x{200B}]+", " ").str.strip_chars(" ")
    return pl.coalesce(collapsed, text)


def split_name(name: pl.Expr, *, normalised: bool = False) -> tuple[pl.Expr, pl.Expr]:
    """Split a full name into first and last name.

    A name with one comma is "family name, given names" ("DUPONT, Jean"),
    unless only a generational suffix follows the comma ("King, Jr."). A
    second comma may set off a generational suffix ("Smith, John, Jr.").
    A generational suffix at the end (II, III, IV, JR, SR) is set aside and
    ends the last name. In the rest, a trailing run of upper-case words is the
    last name with the particles before it ("Marie Claire DUBOIS", "Charles de
    GAULLE", "Seán Ó BRIAIN"), and so is a leading run of upper-case words
    before a capitalised word ("DUBOIS Marie Claire", "de GAULLE Charles").
    Credentials at the end (:data:`CREDENTIALS`) are set aside first and
    end the last name ("Jane Doe, PhD" -> "Jane" / "Doe, PhD"). Titles at
    the start (:data:`TITLES`) are set aside next and open the first name
    ("Dr Jane Doe" -> "Dr Jane" / "Doe"), or are the first name before a
    family name alone ("Mrs van der Merwe" -> "Mrs" / "van der Merwe").
    Where no rule applies, the first whitespace-separated token is the first
    name and the rest, particles included, is the last name ("Pieter van den
    Broek" -> "Pieter" / "van den Broek"). Hyphens never split
    ("Jean-Pierre"). A part in parentheses stays with the word before it
    ("Jean (Johnny) Martin" -> "Jean (Johnny)" / "Martin"), or at the start
    with the word after it. A one-word name is a first name with a null last
    name.

    The patterns read composed letters. With ``normalised=False`` the name is
    stripped, whitespace runs are collapsed to one space
    (:func:`collapse_whitespace`), and the text is put
    in Unicode Normalization Form C, so a decomposed accent ("E" then U+0301)
    reads as the composed letter ("É"). Unlike :func:`compose_marks`, this
    also maps singletons such as U+212B ANGSTROM SIGN. With
    ``normalised=True`` the name must already be stripped, collapsed (as
    :func:`etl.parse.to_typed` leaves it) and composed (:func:`compose_marks`).
    In both cases, commas at the start and the end are dropped, with the
    spaces next to them (:data:`EDGE_COMMA_CHARACTERS`).

    Examples
    --------
    >>> df = pl.DataFrame({"name": ["Jean-Pierre Morel", "Marie Claire DUBOIS", "Teodora"]})
    >>> first, last = split_name(pl.col("name"))
    >>> df.select(first.alias("first"), last.alias("last")).rows()
    [('Jean-Pierre', 'Morel'), ('Marie Claire', 'DUBOIS'), ('Teodora', None)]
    """
    if normalised:
        clean = name
    else:
        clean = collapse_whitespace(name.str.strip_chars()).str.normalize("NFC")
    clean = clean.str.strip_chars(EDGE_COMMA_CHARACTERS)
    credentials = credential_groups(clean)
    base = pl.coalesce(credentials.struct.field("name"), clean)
    titles = title_groups(base)
    base = pl.coalesce(titles.struct.field("name"), base)
    first, last = name_from_candidates(**name_candidates(base))
    first, last = with_titles(
        first,
        last,
        title=titles.struct.field("title"),
        family_name=titles.struct.field("family"),
    )
    return first, with_credentials(last, credentials.struct.field("credentials"))


def credential_groups(clean: pl.Expr) -> pl.Expr:
    """Return the ``name`` and ``credentials`` groups of :data:`NAME_WITH_CREDENTIALS`.

    The struct is null where the name does not end in credentials.
    """
    # Null rows skip the regex with capture groups.
    ending = pl.when(clean.str.contains(CREDENTIAL_AT_END)).then(clean)
    return ending.str.extract_groups(NAME_WITH_CREDENTIALS)


def with_credentials(last: pl.Expr, credentials: pl.Expr) -> pl.Expr:
    """Append ``credentials``, separator included, to ``last`` where both are present."""
    return pl.coalesce(pl.concat_str(last, credentials), last)


def title_groups(clean: pl.Expr) -> pl.Expr:
    """Return the ``title``, ``name`` and ``family`` groups of :data:`NAME_WITH_TITLE`.

    The struct is null where the name opens with no title, or with a title
    and fewer than two words.
    """
    # Null rows skip the regex with capture groups.
    opening = pl.when(clean.str.contains(TITLE_AT_START)).then(clean)
    return opening.str.extract_groups(NAME_WITH_TITLE)


def with_titles(
    first: pl.Expr, last: pl.Expr, *, title: pl.Expr, family_name: pl.Expr
) -> tuple[pl.Expr, pl.Expr]:
    """Put the titles set apart back into the first and last name.

    ``title`` and a space go before ``first`` where both are present. Where
    ``family_name`` is present, it is the whole rest of the name, so
    ``title`` is the first name and ``family_name`` the last name.
    """
    titled = pl.coalesce(pl.concat_str(title, first, separator=" "), first)
    return (
        pl.when(family_name.is_null()).then(titled).otherwise(title),
        pl.coalesce(family_name, last),
    )


def name_candidates(clean: pl.Expr) -> dict[str, pl.Expr]:
    """Return the candidate splits of a normalised name, which :func:`split_name` picks from.

    ``comma`` contains the capture groups of "family, given", whose ``first``
    is null where the name is not in that order. ``upper`` and ``lead`` are
    the capture groups of a trailing and of a leading run of upper-case words,
    null where the name has no such run.
    ``initials`` contains the capture groups of a first word and initials or
    parenthesised parts, null where the name has none. ``words`` is
    the first word and the rest. Eager Polars evaluates an
    expression once per output that uses it, so :func:`transform` stores these
    as columns and builds both names from them with :func:`name_from_candidates`.
    """
    # Null rows skip the regex, so the capture groups run only on candidates.
    trailing = pl.when(clean.str.contains(UPPER_CASE_LAST_WORD)).then(clean)
    leading = pl.when(clean.str.contains(LEADING_UPPER_CASE_WORD)).then(clean)
    with_initials = pl.when(clean.str.contains(INITIAL_AFTER_FIRST_WORD)).then(clean)
    with_comma = pl.when(clean.str.contains(",", literal=True)).then(clean)
    # A lone suffix after the comma is no given name ("King, Jr."). Checking
    # the captured given names costs less than a second regex over every name.
    comma = with_comma.str.extract_groups(COMMA_SEPARATED_NAME).struct.with_fields(
        first=pl.when(~pl.field("first").str.contains(SUFFIX_ONLY)).then(
            pl.field("first")
        )
    )
    return {
        "comma": comma,
        "upper": trailing.str.extract_groups(UPPER_CASE_FAMILY_NAME),
        "lead": leading.str.extract_groups(LEADING_UPPER_CASE_FAMILY_NAME),
        "initials": with_initials.str.extract_groups(NAME_WITH_INITIALS),
        "words": clean.str.splitn(" ", 2),
    }


def name_from_candidates(
    *,
    comma: pl.Expr,
    upper: pl.Expr,
    lead: pl.Expr,
    initials: pl.Expr,
    words: pl.Expr,
) -> tuple[pl.Expr, pl.Expr]:
    """Return the first and last name from the candidates of :func:`name_candidates`."""
    comma_first, comma_last = _given_and_family(comma)
    # A run of generational suffixes and credentials is no family name
    # ("John Smith III", "Jean Martin MD FACS (Johnny)").
    not_family = upper.struct.field("run").str.contains(_NOT_A_FAMILY_NAME)
    upper_last = pl.when(~not_family).then(upper.struct.field("last"))
    upper_first = pl.when(upper_last.is_not_null()).then(upper.struct.field("first"))
    lead_first, lead_last = _given_and_family(lead)
    first = pl.coalesce(
        comma_first,
        upper_first,
        lead_first,
        initials.struct.field("first"),
        words.struct.field("field_0"),
    )
    last = pl.coalesce(
        comma_last,
        upper_last,
        lead_last,
        initials.struct.field("last"),
        words.struct.field("field_1"),
    )
    return first, last


def _given_and_family(groups: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """Return the first name and the family name of ``first``/``last``/``suffix`` groups.

    A suffix after the given names ends the family name ("DUBOIS Marie JR").
    """
    first = groups.struct.field("first")
    last = pl.concat_str(
        groups.struct.field("last"),
        groups.struct.field("suffix"),
        separator=" ",
        ignore_nulls=True,
    )
    return first, pl.when(first.is_not_null()).then(last)


def _unsigned_zero(field: str) -> pl.Expr:
    """Return the Float64 ``field`` with -0.0 as 0.0, so the row never shows "-0.0".

    Adding 0.0 would do it in IEEE 754 arithmetic, but Polars drops the
    addition as a no-op, so the zeros are replaced instead.
    """
    column = pl.col(field)
    return pl.when(column == 0).then(0.0).otherwise(column).alias(field)


def format_timestamp(measured_at: pl.Expr, time_zone: str) -> pl.Expr:
    """Format a UTC datetime as ISO-8601 with milliseconds and the zone's offset.

    >>> from datetime import datetime, timezone
    >>> df = pl.DataFrame({"t": [datetime(2024, 6, 10, 6, 13, 20, tzinfo=timezone.utc)]})
    >>> df.select(format_timestamp(pl.col("t"), "Europe/Paris")).item()
    '2024-06-10T08:13:20.000+02:00'
    """
    return measured_at.dt.convert_time_zone(time_zone).dt.strftime(
        "%Y-%m-%dT%H:%M:%S%.3f%:z"
    )


def transform(
    readings: pl.DataFrame,
    *,
    topic: str,
    rule_set: str,
    time_zone: str,
    with_alert: bool = False,
) -> pl.DataFrame:
    """Build the output rows (columns in :data:`contracts.models.OUTPUT_KEYS` order).

    With ``with_alert``, a last Boolean column ``news2_alert`` marks the rows
    that go to the alerts list (:func:`etl.rules.news2_alert_from_code`).
    """
    # Eager selects: the lazy optimiser cost about 10 ms per call on these
    # expression trees, more than evaluating them on a 50k-row chunk. Eager
    # Polars shares no subexpression, so the parts that two output columns
    # read are stored as columns first.
    shared, columns, alert = _output_columns(topic, rule_set, time_zone)
    keys = OUTPUT_KEYS
    if with_alert:
        columns = (*columns, alert)
        keys = [*OUTPUT_KEYS, "news2_alert"]
    return (
        readings.hstack(_first_and_last_names(readings["name"]))
        .with_columns(shared)
        .select(columns)
        .select(keys)
    )


def _first_and_last_names(name: pl.Series) -> list[pl.Series]:
    """Return the ``first_name`` and ``last_name`` columns of the names in ``name``.

    A monitor sends a reading every few seconds, so each patient's name
    comes back many times in a chunk. Where at most half of the names are
    distinct, the patterns of the split run once per distinct name, and the
    parts are joined back to the rows.
    """
    distinct = name.unique()
    if 2 * distinct.len() > name.len():
        parts = _split_names(name)
    else:
        parts = name.to_frame().join(
            _split_names(distinct), on="name", how="left", maintain_order="left"
        )
    return [parts["first_name"], parts["last_name"]]


def _split_names(name: pl.Series) -> pl.DataFrame:
    """Split ``name`` as :func:`split_name` does: ``name``, ``first_name``, ``last_name``.

    The names must be stripped and collapsed, as :func:`etl.parse.to_typed`
    leaves them.
    """
    # The contract checked the name as sent; the split reads its composed form.
    names = pl.DataFrame(
        {"_sent": name, "name": strip_edge_commas(compose_marks(name))}
    )
    has_credentials = names["name"].str.contains(CREDENTIAL_AT_END).any()
    if has_credentials:
        names = _set_credentials_apart(names)
    has_title = names["name"].str.contains(TITLE_AT_START).any()
    if has_title:
        names = _set_titles_apart(names)
    shared, first_name, last_name = _name_columns(
        credentials=has_credentials, titles=has_title
    )
    return names.with_columns(shared).select(
        pl.col("_sent").alias("name"),
        first_name.alias("first_name"),
        last_name.alias("last_name"),
    )


def _set_credentials_apart(readings: pl.DataFrame) -> pl.DataFrame:
    """Cut the credentials off ``name`` into the column ``_name_credentials``."""
    groups = readings.select(credential_groups(pl.col("name"))).to_series()
    return readings.with_columns(
        pl.coalesce(pl.lit(groups.struct.field("name")), pl.col("name")).alias("name"),
        groups.struct.field("credentials").alias("_name_credentials"),
    )


def _set_titles_apart(readings: pl.DataFrame) -> pl.DataFrame:
    """Cut the titles off ``name`` into the column ``_name_titles``.

    A family name alone after the titles is copied to ``_name_family``.
    """
    groups = readings.select(title_groups(pl.col("name"))).to_series()
    return readings.with_columns(
        pl.coalesce(pl.lit(groups.struct.field("name")), pl.col("name")).alias("name"),
        groups.struct.field("title").alias("_name_titles"),
        groups.struct.field("family").alias("_name_family"),
    )


@functools.lru_cache(maxsize=8)
def _name_columns(
    *, credentials: bool, titles: bool
) -> tuple[tuple[pl.Expr, ...], pl.Expr, pl.Expr]:
    """Build the shared parts and the first and last name of :func:`_split_names`.

    With ``credentials``, the last name ends with the ``_name_credentials``
    column. With ``titles``, the first name starts with ``_name_titles``, or
    is only that where ``_name_family`` is present and is the last name.
    """
    name_parts = name_candidates(pl.col("name"))
    shared = tuple(expr.alias(f"_name_{part}") for part, expr in name_parts.items())
    first_name, last_name = name_from_candidates(
        **{part: pl.col(f"_name_{part}") for part in name_parts}
    )
    if titles:
        first_name, last_name = with_titles(
            first_name,
            last_name,
            title=pl.col("_name_titles"),
            family_name=pl.col("_name_family"),
        )
    if credentials:
        last_name = with_credentials(last_name, pl.col("_name_credentials"))
    return shared, first_name, last_name


@functools.lru_cache(maxsize=32)
def _output_columns(
    topic: str, rule_set: str, time_zone: str
) -> tuple[tuple[pl.Expr, ...], tuple[pl.Expr, ...], pl.Expr]:
    """Build the expressions of the shared parts, the output columns and the alert once."""
    news2_code = rules.news2_code(
        respiratory_rate=pl.col("respiratory_rate"),
        spo2=pl.col("spo2"),
        on_oxygen=pl.col("on_oxygen"),
        systolic=pl.col("systolic"),
        heart_rate=pl.col("heart_rate"),
        consciousness=pl.col("consciousness"),
        temperature=pl.col("temperature"),
        spo2_scale=pl.col("spo2_scale"),
    )
    shared = (news2_code.alias("_news2_code"),)
    news2_score, news2_risk = rules.news2_from_code(
        pl.col("_news2_code"), age=pl.col("age")
    )
    status = rules.bp_status(
        rule_set,
        systolic=pl.col("systolic"),
        diastolic=pl.col("diastolic"),
        age=pl.col("age"),
        sex=pl.col("sex"),
    )
    columns = (
        pl.col("patient_id"),
        pl.col("first_name"),
        pl.col("last_name"),
        pl.col("age"),
        # pl.format panics on some filtered frames in Polars 2.1.0
        # ("assertion failed: i < self.len()"); concat_str gives the same text.
        pl.concat_str(
            pl.col("systolic").cast(pl.String),
            pl.col("diastolic").cast(pl.String),
            separator="/",
        ).alias("blood_pressure"),
        status.alias("blood_pressure_status"),
        _unsigned_zero("heart_rate"),
        pl.col("temperature"),
        format_timestamp(pl.col("measured_at"), time_zone).alias("timestamp"),
        pl.col("systolic"),
        pl.col("diastolic"),
        _unsigned_zero("spo2"),
        _unsigned_zero("respiratory_rate"),
        news2_score.cast(pl.Int64).alias("news2_score"),
        news2_risk.alias("news2_risk"),
        pl.lit(rule_set).alias("rule_set"),
        pl.struct(
            pl.lit(topic).alias("topic"), pl.col("partition"), pl.col("offset")
        ).alias("source"),
    )
    alert = rules.news2_alert_from_code(pl.col("_news2_code"), age=pl.col("age"))
    return shared, columns, alert
