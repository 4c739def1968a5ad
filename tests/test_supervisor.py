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
