"""Process helpers for the dashboard's end-to-end tests: real `muster` processes whose output is
collected by a thread and waited on with deadlines (never a sleep that stands for a condition)."""

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request


class Proc:
    """A child process; its merged output is kept and can be waited on."""

    def __init__(self, argv, env=None, stdin=subprocess.DEVNULL, log_path=None):
        self.argv = argv
        self.proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.out = ""
        self.cv = threading.Condition()
        self.log = open(log_path, "w") if log_path else None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            text = line.decode(errors="replace")
            if self.log:
                self.log.write(text)
                self.log.flush()
            with self.cv:
                self.out += text
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait_for(self, pattern, timeout):
        """The first match of regex `pattern` in the output, or AssertionError at the deadline."""
        rx = re.compile(pattern)
        with self.cv:
            ok = self.cv.wait_for(lambda: rx.search(self.out) or self.proc.poll() is not None,
                                  timeout)
            m = rx.search(self.out)
        if not m:
            raise AssertionError(f"{self.argv[:3]}: no {pattern!r} within {timeout} s "
                                 f"(exit {self.proc.poll()}); output:\n{self.out[-4000:]}")
        return m

    def stop(self, timeout=10):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log:
            self.log.close()
            self.log = None


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def wait_until(what, fn, timeout, interval=0.2):
    """Polls fn() until it returns a truthy value; that value, or AssertionError at the deadline.
    (Polling an HTTP API is the condition here: there is nothing to block on.)"""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except (urllib.error.URLError, ConnectionError, KeyError, IndexError, ValueError) as e:
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error})")
