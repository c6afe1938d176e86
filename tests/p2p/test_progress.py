"""The progress bar off a terminal (a job's log) prints plain lines; on one it leaves drawing to tqdm."""

import io

from p2p.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_update_past_the_interval_prints_a_line_and_the_end_says_done():
    log = io.StringIO()
    with ProgressBar(3, "oppu: one LoRA per user", "user", line_every_s=0.0, stream=log) as bar:
        for _ in range(3):
            bar.update()
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["oppu: one LoRA per user: 1/3 users", "oppu: one LoRA per user: 2/3 users",
                                                    "oppu: one LoRA per user: 3/3 users", "oppu: one LoRA per user: 3/3 users"]
    assert lines[-1].endswith("(done)") and all(line.endswith("(running)") for line in lines[:-1])
    assert "\r" not in log.getvalue()  # no carriage-return redraws in a log file


def test_off_a_terminal_lines_wait_for_the_interval_and_an_unknown_total_is_left_out():
    log = io.StringIO()
    with ProgressBar(None, "generate", "user", line_every_s=3600.0, stream=log) as bar:
        bar.update(64)
        bar.update(10)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1  # the interval was never reached: only the last line
    assert lines[0].startswith("generate: 74 users,") and lines[0].endswith("(done)")


def test_nothing_done_prints_nothing():
    log = io.StringIO()
    ProgressBar(5, "synth", "user", line_every_s=0.0, stream=log).close()
    assert log.getvalue() == ""


def test_on_a_terminal_tqdm_draws_the_bar_and_no_plain_lines_are_printed():
    term = Terminal()
    with ProgressBar(2, "synth", "user", line_every_s=0.0, stream=term) as bar:
        bar.update(2)
    assert "\r" in term.getvalue() and "2/2" in term.getvalue()
    assert "(done)" not in term.getvalue() and "(running)" not in term.getvalue()


def test_a_loop_left_by_an_error_ends_with_stopped_not_done():
    log = io.StringIO()
    try:
        with ProgressBar(4, "oppu: one LoRA per user", "user", line_every_s=3600.0, stream=log) as bar:
            bar.update()
            raise RuntimeError("user u7: no history")
    except RuntimeError:
        pass
    assert log.getvalue().startswith("oppu: one LoRA per user: 1/4 users,")
    assert log.getvalue().rstrip().endswith("(stopped)")
