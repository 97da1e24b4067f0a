"""Unit tests for cratemirror.names: crate-name and version rules, index paths, dl templates."""

from __future__ import annotations

import random
import string

import pytest

from cratemirror.names import (
    MAX_NAME_LENGTH,
    MAX_VERSION_LENGTH,
    InvalidRequest,
    expand_dl_template,
    index_path,
    parse_crate_version,
    parse_index_path,
    parse_name,
    parse_version,
)

CKSUM = "ab" * 32
NAME_FIRST = string.ascii_letters
NAME_REST = string.ascii_letters + string.digits + "-_"

# ---- names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "Z", "serde", "serde_json", "aho-corasick", "Inflector", "a1", "a-", "a_", "x" * MAX_NAME_LENGTH],
)
def test_valid_names(name: str) -> None:
    assert parse_name(name).name == name
    assert parse_name(name).lower == name.lower()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "1a",
        "_a",
        "-a",
        "a b",
        " a",
        "a\t",
        "é",
        "aé",
        "\u017ferde",  # LATIN SMALL LETTER LONG S: non-ASCII, though it uppercases to ASCII 'S'
        "a.b",
        "a/b",
        "..",
        "a\x00",
        "a\r\n",
        "a+b",
        "a" * (MAX_NAME_LENGTH + 1),
        "a" * 1000,
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_name(name)
    assert "\n" not in str(raised.value)  # the reason is sent as a one-line body


def test_name_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_name("9")


# ---- versions -----------------------------------------------------------------------------------------


def _long_version(length: int) -> str:
    version = "1.0.0-" + "a" * (length - len("1.0.0-"))
    assert len(version) == length
    return version


@pytest.mark.parametrize(
    "version",
    [
        "0.0.0",
        "1.2.3",
        "10.20.30",
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-0.3.7",
        "1.0.0-x-y-z.--",
        "1.0.0+build.7",
        "1.0.0+20130313144700",
        "1.0.0-rc.1+build.5",
        "0.2.1+build.5",
        "1.0.0+wasi-0.2.4",
        _long_version(MAX_VERSION_LENGTH),
    ],
)
def test_valid_versions(version: str) -> None:
    assert parse_version(version) == version


@pytest.mark.parametrize(
    "version",
    [
        "",
        "1",
        "1.0",
        "01.0.0",
        "1.01.0",
        "1.0.01",
        "1.0.0.0",
        "v1.0.0",
        " 1.0.0",
        "1.0.0 ",
        "1.0.0\n",
        "1.0.0-",
        "1.0.0+",
        "1.0.0+build..1",
        "1.0.0-a..b",
        "1.0.0+bü",
        "1.0.0/../x",
        "1.0.0%2B",
        "^1.0.0",
        _long_version(MAX_VERSION_LENGTH + 1),
        "1.0.0+" + "b" * 1000,
    ],
)
def test_invalid_versions(version: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_version(version)
    assert "\n" not in str(raised.value)


def test_parse_crate_version() -> None:
    parsed = parse_crate_version("Inflect", "0.1.0+build.7")
    assert parsed.crate.name == "Inflect"
    assert parsed.version == "0.1.0+build.7"
    assert parsed.key == "Inflect/0.1.0+build.7"
    with pytest.raises(InvalidRequest):
        parse_crate_version("9nope", "1.0.0")
    with pytest.raises(InvalidRequest):
        parse_crate_version("serde", "1.0")


# ---- index paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("a", "1/a"),
        ("A", "1/a"),
        ("ab", "2/ab"),
        ("AB", "2/ab"),
        ("syn", "3/s/syn"),
        ("Syn", "3/s/syn"),
        ("abcd", "ab/cd/abcd"),
        ("serde", "se/rd/serde"),
        ("Inflector", "in/fl/inflector"),
        ("aho-corasick", "ah/o-/aho-corasick"),
        ("a-b_c", "a-/b_/a-b_c"),
        ("A_B-C", "a_/b-/a_b-c"),
    ],
)
def test_index_path(name: str, path: str) -> None:
    assert index_path(name) == path
    assert parse_name(name).index_path == path
    assert parse_index_path(path).name == name.lower()


@pytest.mark.parametrize(
    "path",
    [
        "",
        "serde",
        "se/serde",
        "se/rd/serdf/serde",
        "xx/yy/serde",
        "se/rd/x/serde",
        "SE/RD/serde",
        "Se/rd/serde",
        "s/e/serde",
        "1/ab",
        "2/a",
        "2/abc",
        "3/syn",
        "3/S/syn",
        "3/x/syn",
        "3/s/s/syn",
        "1/a/a",
        "/se/rd/serde",
        "se/rd/serde/",
        "se//rd/serde",
        "se/rd/../serde",
        "../../etc/passwd",
        "se/rd/9erde",
        "1/1",
        "in/fl/" + "inflector" * 10,
    ],
)
def test_parse_index_path_rejects(path: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_index_path(path)
    assert "\n" not in str(raised.value)


def _random_name(rng: random.Random) -> str:
    length = rng.randint(1, MAX_NAME_LENGTH)
    return rng.choice(NAME_FIRST) + "".join(rng.choice(NAME_REST) for _ in range(length - 1))


def test_index_path_round_trip_random_names() -> None:
    """Property: for any valid name, its index path parses back to it (lowercased, as cargo asks), and
    the same file under another prefix is refused."""
    rng = random.Random(20240517)
    for _ in range(2000):
        name = _random_name(rng)
        assert parse_name(name).name == name
        path = index_path(name)
        assert path == path.lower()
        assert path.rsplit("/", 1)[-1] == name.lower()
        assert parse_index_path(path).name == name.lower()
        wrong = "zz/zz/" + name.lower() if not name.lower().startswith("zzzz") else "yy/yy/" + name.lower()
        with pytest.raises(InvalidRequest):
            parse_index_path(wrong)


def test_random_strings_outside_the_alphabet_are_refused() -> None:
    rng = random.Random(7)
    outside = "./\\ \t\x00%+é~:?#@!$&'()*,;=\"<>[]{}|^`"
    for _ in range(500):
        name = _random_name(rng)
        position = rng.randrange(len(name) + 1)
        bad = name[:position] + rng.choice(outside) + name[position:]
        with pytest.raises(InvalidRequest):
            parse_name(bad)


# ---- dl templates -------------------------------------------------------------------------------------


def test_dl_template_without_markers_appends_the_api_path() -> None:
    assert (
        expand_dl_template("https://static.crates.io/crates", "Inflect", "0.1.0", CKSUM)
        == "https://static.crates.io/crates/Inflect/0.1.0/download"
    )
    assert (
        expand_dl_template("http://127.0.0.1:9/api/v1/crates", "meta", "1.0.0%2Bbuild.7", CKSUM)
        == "http://127.0.0.1:9/api/v1/crates/meta/1.0.0%2Bbuild.7/download"
    )


@pytest.mark.parametrize(
    ("template", "crate", "expected"),
    [
        ("https://h/{crate}", "Inflect", "https://h/Inflect"),
        ("https://h/x/{version}", "Inflect", "https://h/x/0.1.0"),
        ("https://h/{prefix}", "Inflect", "https://h/In/fl"),
        ("https://h/{lowerprefix}", "Inflect", "https://h/in/fl"),
        ("https://h/{sha256-checksum}", "Inflect", f"https://h/{CKSUM}"),
        ("https://h/{prefix}/{lowerprefix}", "A", "https://h/1/1"),
        ("https://h/{prefix}/{lowerprefix}", "Ab", "https://h/2/2"),
        ("https://h/{prefix}/{lowerprefix}", "Abc", "https://h/3/A/3/a"),
        ("https://h/{prefix}/{lowerprefix}", "serde", "https://h/se/rd/se/rd"),
        (
            "https://h/files/{lowerprefix}/{crate}/{crate}-{version}.crate",
            "Inflect",
            "https://h/files/in/fl/Inflect/Inflect-0.1.0.crate",
        ),
        (
            "https://h/q?c={crate}&v={version}&s={sha256-checksum}",
            "serde",
            f"https://h/q?c=serde&v=0.1.0&s={CKSUM}",
        ),
    ],
)
def test_dl_template_markers(template: str, crate: str, expected: str) -> None:
    assert expand_dl_template(template, crate, "0.1.0", CKSUM) == expected
