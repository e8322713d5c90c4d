"""A real one-node SLURM on this machine for tests/test_cluster.py: munged, slurmctld and slurmd on localhost.

`start()` reuses the daemons that already run and starts the missing ones (as root), writing /etc/slurm/slurm.conf
for this host when there is none, then waits until `sinfo` shows the node idle; `stop()` stops only what `start()`
started. A machine without SLURM is an error naming the install command (CI installs it in .ci/run), never a skip.
Steps: /work/shared/recipes/slurm-one-node.md (Debian 12, slurm-wlm 22.05).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

INSTALL = "apt-get update && apt-get install -y slurm-wlm munge"
CONF = pathlib.Path("/etc/slurm/slurm.conf")
SBIN = pathlib.Path("/usr/sbin")
COMMANDS = ("srun", "sbatch", "sinfo", "scontrol")
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmUnavailable(RuntimeError):
  """SLURM is not installed, or its daemons cannot be started here."""


def _conf_text(host: str) -> str:
  # No cgroup.conf: slurm 22.05 does not know CgroupPlugin=disabled (slurmd then fails to start).
  return "\n".join([
      "ClusterName=local", f"SlurmctldHost={host}", "SlurmUser=root", "StateSaveLocation=/var/spool/slurmctld",
      "SlurmdSpoolDir=/var/spool/slurmd", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
      "JobAcctGatherType=jobacct_gather/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
      "ReturnToService=2", "MpiDefault=none", "SlurmctldLogFile=/var/log/slurm/slurmctld.log",
      "SlurmdLogFile=/var/log/slurm/slurmd.log", f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
      f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""])


def _ok(argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess:
  return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _munge_works() -> bool:
  cred = _ok(["munge", "-n"])
  if cred.returncode != 0:
    return False
  check = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, text=True, timeout=10, check=False)
  return check.returncode == 0 and "Success" in check.stdout


def _controller_up() -> bool:
  return "UP" in _ok(["scontrol", "ping"]).stdout


def _node_state(host: str) -> str:
  return _ok(["sinfo", "-h", "-n", host, "-o", "%T"]).stdout.strip()


def _pids(name: str) -> set[int]:
  out = _ok(["pgrep", "-x", name]).stdout
  return {int(p) for p in out.split()}


class Cluster:
  """The local SLURM: `start()` then `stop()`; `started` holds {daemon: pids} of those this object started."""

  def __init__(self):
    self.host = socket.gethostname()
    self.started: dict[str, set[int]] = {}

  def start(self, timeout_s: float = 60) -> Cluster:
    missing = [c for c in COMMANDS if shutil.which(c) is None] + [d for d in DAEMONS if not (SBIN / d).exists()]
    if missing:
      raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} not found); install it with "
                             f"`{INSTALL}` (as root; .ci/run does this in CI)")
    if not _munge_works():
      self._need_root("munged")
      for d in ("/run/munge", "/var/lib/munge", "/var/log/munge", "/etc/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
      key = pathlib.Path("/etc/munge/munge.key")
      if not key.exists():
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
      self._run_daemon("munged", ["runuser", "-u", "munge", "--", str(SBIN / "munged")])
      self._wait(_munge_works, timeout_s, "munge -n | unmunge to succeed (/var/log/munge/munged.log)")
    if not CONF.exists():
      self._need_root("slurm.conf")
      CONF.write_text(_conf_text(self.host))
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
      os.makedirs(d, exist_ok=True)
    if not _controller_up():
      self._need_root("slurmctld")
      self._run_daemon("slurmctld", [str(SBIN / "slurmctld")])
      self._wait(_controller_up, timeout_s, "`scontrol ping` to say UP (/var/log/slurm/slurmctld.log)")
    if not _pids("slurmd"):
      self._need_root("slurmd")
      self._run_daemon("slurmd", [str(SBIN / "slurmd")])
    self._wait(lambda: _node_state(self.host).rstrip("*") in ("idle", "mixed", "allocated"), timeout_s,
               f"`sinfo` to show {self.host} idle (/var/log/slurm/slurmd.log)", resume=True)
    return self

  def _need_root(self, what: str) -> None:
    if os.geteuid() != 0:
      raise SlurmUnavailable(f"SLURM is installed but {what} is not running, and starting it needs root")

  def _run_daemon(self, name: str, argv: list[str]) -> None:
    before = _pids(name)
    proc = _ok(argv, timeout=30)  # each daemonizes: the command returns once it runs in the background
    if proc.returncode != 0:
      raise SlurmUnavailable(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")
    self.started[name] = _pids(name) - before

  def _wait(self, ready, timeout_s: float, what: str, resume: bool = False) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if ready():
        return True
      if resume and _node_state(self.host).rstrip("*") in ("down", "drained", "draining"):
        _ok(["scontrol", "update", f"nodename={self.host}", "state=resume"])
      time.sleep(0.5)
    raise SlurmUnavailable(f"waited {timeout_s:.0f} s for {what}; sinfo: {_ok(['sinfo']).stdout.strip()}")

  def stop(self) -> None:
    """Stops the daemons this object started (SIGTERM to their pids, slurmd first), waiting until they are gone."""
    for name in ("slurmd", "slurmctld", "munged"):
      # Still running under the daemon's name (a pid seen at start may have been a parent that exited since).
      pids = self.started.pop(name, set()) & _pids(name)
      for pid in pids:
        try:
          os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
          pass
      deadline = time.monotonic() + 20
      while time.monotonic() < deadline and pids & _pids(name):
        time.sleep(0.2)


if __name__ == "__main__":  # python tests/slurm_local.py: start the daemons and leave them running
  c = Cluster().start()
  print(f"SLURM up on {c.host}; started: {c.started or 'nothing (all were running)'}")
  print(_ok(["sinfo"]).stdout)
