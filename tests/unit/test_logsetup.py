"""``[logging] level`` filters what reaches the observers."""

from twisted.logger import Logger, LogPublisher

from storage.logsetup import apply_log_level


def test_level_filters_lower_levels():
    publisher = LogPublisher()
    seen = []
    publisher.addObserver(seen.append)
    assert apply_log_level("WARNING", publisher) == 1
    log = Logger(observer=publisher)
    log.info("quiet")
    log.debug("quieter")
    log.warn("loud")
    log.error("louder")
    assert [e["log_format"] for e in seen] == ["loud", "louder"]
    # applying again does not double-wrap
    assert apply_log_level("WARNING", publisher) == 0
