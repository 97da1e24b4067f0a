"""The operator tools' progress: a tqdm bar on a terminal, plain lines (never a bar) off one."""

from __future__ import annotations

import io

from cratemirror.tools.common import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_notes_stay_visible() -> None:
    screen = Terminal()
    progress = Progress("verify", 4, stream=screen)
    for number in range(4):
        progress.step(f"crate{number} 1.0.0")
    progress.note("CORRUPT crate2 1.0.0: bytes hash to ...")
    progress.finish()
    text = screen.getvalue()
    assert "\r" in text and "verify" in text and "4/4" in text  # tqdm redraws in place
    assert "verify: CORRUPT crate2 1.0.0: bytes hash to ...\n" in text


def test_off_a_terminal_only_lines() -> None:
    log = io.StringIO()
    progress = Progress("import", 3, stream=log, every=2)
    progress.step("a 1.0.0", "loaded a 1.0.0")
    progress.step("b 1.0.0")
    progress.step("c 1.0.0")
    progress.note("REFUSED d 1.0.0: bad")
    progress.finish()
    assert log.getvalue().splitlines() == [
        "import: [1/3] loaded a 1.0.0",
        "import: 2/3",
        "import: REFUSED d 1.0.0: bad",
    ]
    assert "\r" not in log.getvalue()
