from carousel.train.progress import duration, human, progress_line


def test_formatting():
    assert human(999) == "999" and human(12_345) == "12.3k" and human(2.5e6) == "2.5M"
    assert duration(75) == "1m15s" and duration(3725) == "1h02m05s"
    line = progress_line(5, 100, 4.0, 54.6, 1e-3, 12_000, 60)
    assert line.startswith("step   5/100") and "12.0k tok/s" in line and "eta 1m00s" in line
