"""`duet up`'s supervisor: a crashed child comes back and is counted; stop ends every child."""

import sys

from duet.supervisor import RESTARTS, Child, Supervisor, kill_group, spawn
from tests.waiting import wait_until


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
    def restarted_twice() -> bool:
        sup.check()
        return len(marker.read_text()) >= 3

    wait_until(restarted_twice, 20, "the flaky child to be restarted twice", 0.05)
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


def test_a_killed_childs_own_children_die_with_it(tmp_path):
    """What SIGKILL of the API did: its engine processes lived on as orphans. The supervisor now kills the
    dead child's whole process group before restarting it."""
    import os
    import signal

    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(g.pid)); time.sleep(120)")
    sup = Supervisor(poll_s=0.05)
    parent = sup.add(Child("parent", lambda: spawn([sys.executable, "-c", script], {}, tmp_path / "p.log")))
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 20, "the child to write its pid", 0.05)
        grandchild = int(pid_file.read_text())
        first = parent.proc
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        sup.check()  # sees the exit: reaps the group, schedules the restart
        wait_until(lambda: not _alive(grandchild), 10, "the grandchild to exit", 0.05)
        assert not _alive(grandchild), "the killed child's own child outlived it"
    finally:
        sup.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie waiting for its reaper is dead
    except FileNotFoundError:
        return False


def test_die_with_parent_ends_a_child_when_its_parent_is_killed(tmp_path):
    """How serving runs its relay (`duet relay --with-parent`): the kernel ends it with its parent."""
    import os
    import signal

    pid_file = tmp_path / "child.pid"
    armed = tmp_path / "armed"  # the child says when die_with_parent() has taken effect
    child = ("import time; from duet.processes import die_with_parent; die_with_parent(); "
             f"open({str(armed)!r}, 'w').write('1'); time.sleep(120)")
    script = (f"import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              f"open({str(pid_file)!r}, 'w').write(str(g.pid)); time.sleep(120)")
    parent = spawn([sys.executable, "-c", script], dict(os.environ), tmp_path / "p.log")
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 20, "the child to write its pid", 0.05)
        wait_until(armed.exists, 20, "the child to arm die_with_parent()", 0.05)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        grandchild = int(pid_file.read_text())
        wait_until(lambda: not _alive(grandchild), 10, "the grandchild to exit", 0.05)
        assert not _alive(grandchild)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        kill_group(parent)
