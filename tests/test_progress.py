"""clim_fast.progress: what a long pass shows on stderr, piped and in a terminal."""

import io
import re

from clim_fast.progress import PassProgress, fmt_seconds


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_piped_a_line_at_most_every_few_seconds_with_rate_and_eta_and_one_at_the_end():
    stream = io.StringIO()
    with PassProgress("features", 100, stream=stream, every_s=3600) as progress:
        for _ in range(10):
            progress.advance(10)  # within every_s: no line yet
        assert stream.getvalue() == ""
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"features: 100/100 \([\d,.]+/s, \d+s elapsed, ETA 0s\)", lines[0])
    stream = io.StringIO()
    with PassProgress("training", 600, 200, stream=stream, every_s=0) as progress:  # resumed at 200
        progress.describe("epoch 2 loss 4.210")
        progress.advance_to(300)
    first = stream.getvalue().splitlines()[0]
    assert first.startswith("epoch 2 loss 4.210: 300/600 (") and "ETA" in first


def test_in_a_terminal_a_live_bar_without_plain_lines():
    stream = Terminal()
    with PassProgress("features", 40, stream=stream) as progress:
        progress.advance(40)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
    assert "features" in text and "40/40" in text and "ETA" in text and "/s," not in text


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (None, float("nan"), -1, 0, 59.4, 61, 3600)] == \
        ["?", "?", "?", "0s", "59s", "1m01s", "60m00s"]
