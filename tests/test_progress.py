"""Progress off a terminal: plain lines at most every interval, and always the last one."""

import io

from jaxdist.progress import Progress


def test_plain_lines_come_at_most_every_interval_and_at_the_end():
    now, out = [0.0], io.StringIO()
    bar = Progress("epoch 1/2", total=10, done=2, every=30, bar=False, out=out,
                   clock=lambda: now[0])
    for _ in range(8):
        now[0] += 10  # a step every 10 s: a line every third step, and the last
        bar.update(1, "loss 0.5")
    assert out.getvalue().splitlines() == [
        "epoch 1/2 | step 5/10 | loss 0.5", "epoch 1/2 | step 8/10 | loss 0.5",
        "epoch 1/2 | step 10/10 | loss 0.5"]


def test_every_0_prints_each_update_and_disabled_prints_nothing():
    out = io.StringIO()
    bar = Progress("decoding", total=3, unit="images", every=0, bar=False, out=out)
    for _ in range(3):
        bar.update()
    assert out.getvalue().splitlines() == [f"decoding | images {k}/3" for k in (1, 2, 3)]
    quiet = io.StringIO()
    off = Progress("x", total=3, enabled=False, out=quiet)
    off.update(3)
    assert quiet.getvalue() == ""
