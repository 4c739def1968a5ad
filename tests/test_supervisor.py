"""`duet up`'s supervisor: a crashed child comes back and is counted; stop ends every child."""

import sys
import time

from duet.supervisor import RESTARTS, Child, Supervisor, spawn


def _restarts(name: str) -> float:
    return RESTARTS.labels(child=name)._value.get()


def test_crashed_child_is_restarted_and_counted(tmp_path):
    sup = Supervisor(poll_s=0.05)
    marker = tmp_path / "starts"
    marker.write_text("")
    script = f"open({str(marker)!r}, 'a').write('x'); import time; time.sleep(0.2 if len(open({str(marker)!r}).read()) < 3 else 60)"
    before = _restarts("flaky")
    flaky = sup.add(Child("flaky", lambda: spawn([sys.executable, "-c", script], {}, tmp_path / "flaky.log")))
    steady = sup.add(Child("steady", lambda: spawn([sys.executable, "-c", "import time; time.sleep(60)"], {},
                                                   tmp_path / "steady.log")))
    deadline = time.time() + 20
    while len(marker.read_text()) < 3 and time.time() < deadline:
        sup.check()
        time.sleep(0.05)
    try:
        assert len(marker.read_text()) == 3  # started, crashed twice, restarted twice (back-off 1 s, 2 s)
        assert _restarts("flaky") - before == 2 and flaky.exits == [0, 0]
        assert steady.restarts == 0 and steady.proc.poll() is None
    finally:
        sup.stop()
    assert flaky.proc.poll() is not None and steady.proc.poll() is not None
    sup.check()  # a stopping supervisor restarts nothing
    assert flaky.proc.poll() is not None


def test_child_output_goes_to_its_log(tmp_path):
    proc = spawn([sys.executable, "-c", "print('hello from child')"], {}, tmp_path / "logs" / "c.log")
    proc.wait(10)
    assert "hello from child" in (tmp_path / "logs" / "c.log").read_text()


def test_up_starts_a_private_redis_when_none_answers(tmp_path):
    import shutil

    import pytest
    import redis

    from duet.cli import _redis_for_up
    from duet.settings import Settings

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    sup = Supervisor()
    s = Settings(redis_url="redis://127.0.0.1:1/0", home=tmp_path / "home")
    try:
        url = _redis_for_up(s, sup, tmp_path / "run")
        assert url != s.redis_url
        r = redis.Redis.from_url(url)
        assert r.ping() and r.config_get("appendonly")["appendonly"] == "yes"
        assert [c.name for c in sup.children] == ["redis"]
    finally:
        sup.stop()
    assert sup.children[0].proc.poll() is not None


def test_up_without_any_redis_says_how_to_get_one(tmp_path, monkeypatch):
    import pytest

    from duet.cli import CLIError, _redis_for_up
    from duet.settings import Settings

    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server to be found
    with pytest.raises(CLIError, match="no redis-server is on PATH"):
        _redis_for_up(Settings(redis_url="redis://127.0.0.1:1/0", home=tmp_path), Supervisor(), tmp_path)
